"""The command line is generated from the stages' typed dataclass configs.

Every field becomes an option (`--field-name`) with the field's help text; a field marked positional in
its metadata becomes an argument. `--config FILE.yaml` loads values first; options given on the command
line override them; the dataclass's __post_init__ validates the result.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any, Literal, get_args, get_origin

import yaml

from ..core.errors import InputError


def _unwrap_optional(tp):
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _scalar(tp, name):
    def parse(text: str):
        if tp is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"{name}: expected true or false, got {text!r}")
        try:
            return tp(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected {tp.__name__}, got {text!r}") from None
    parse.__name__ = getattr(tp, "__name__", "value")
    return parse


def _describe(f: dataclasses.Field, tp) -> str:
    help_text = f.metadata.get("help", "")
    if get_origin(tp) is Literal:
        help_text += f" (one of: {', '.join(map(str, get_args(tp)))})"
    if f.default is not dataclasses.MISSING and f.default not in (None, "") and not isinstance(f.default, bool):
        help_text += f" [default: {f.default}]"
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        d = f.default_factory()  # type: ignore[misc]
        if d:
            help_text += f" [default: {','.join(map(str, d))}]"
    return help_text


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls, include_extras=False)
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"help": _describe(f, tp), "default": argparse.SUPPRESS}
        positional = f.metadata.get("positional", False)
        if get_origin(tp) is list:
            (inner,) = get_args(tp)
            if positional:
                parser.add_argument(f.name, nargs="*", type=_scalar(inner, f.name),
                                    metavar=f.metadata.get("metavar", f.name.upper()), **kw)
            else:
                parser.add_argument(flag, type=_list(inner, f.name), metavar="A,B,...", **kw)
            continue
        if get_origin(tp) is Literal:
            kw["choices"] = list(get_args(tp))
            tp = type(get_args(tp)[0])
        if tp is bool and not positional:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if positional:
            parser.add_argument(f.name, nargs="?", type=_scalar(tp, f.name),
                                metavar=f.metadata.get("metavar", f.name.upper()), **kw)
        else:
            flags = [f.metadata["flag"], flag] if f.metadata.get("flag") else [flag]
            parser.add_argument(*flags, dest=f.name, type=_scalar(tp, flag), metavar=tp.__name__.upper(), **kw)


def _list(inner, name):
    scalar = _scalar(inner, name)

    def parse(text: str):
        return [scalar(p.strip()) for p in text.split(",") if p.strip()]
    return parse


def load_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise InputError(f"{path}: no such config file") from None
    except (UnicodeDecodeError, ValueError) as err:  # a binary file (yaml refuses its bytes before parsing)
        raise InputError(f"{path}: not a YAML text file ({type(err).__name__})") from None
    except IsADirectoryError:
        raise InputError(f"{path}: a directory, not a config file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise InputError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a config file must be a mapping of option: value")
    return data


def build_config(cls, yaml_values: dict, cli_values: dict, source: str = "config"):
    """Merge YAML values and command-line values (which win) into cls, checking names and types."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for raw_key, value in (yaml_values or {}).items():
        key = str(raw_key).replace("-", "_")
        if key not in names:
            raise InputError(f"{source}: unknown option {raw_key!r} for {cls.__name__} "
                             f"(known: {', '.join(sorted(names))})")
        values[key] = _coerce(value, hints[key], f"{source}: {raw_key}")
    for key, value in cli_values.items():  # every float option is finite (YAML values: in _coerce)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise InputError(f"--{key.replace('_', '-')}: expected a finite number, got {v}")
    values.update(cli_values)
    obj = cls(**values)
    obj._given = frozenset(values)  # the options the user named (train's resume keeps a run's own for the rest)
    return obj


def _coerce(value, tp, where):
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise InputError(f"{where}: a value is required")
    if get_origin(tp) is list:
        (inner,) = get_args(tp)
        items = value if isinstance(value, list) else [p for p in str(value).split(",") if p.strip()]
        return [_coerce(v, inner, where) for v in items]
    if get_origin(tp) is Literal:
        if value not in get_args(tp):
            raise InputError(f"{where}: expected one of {', '.join(map(str, get_args(tp)))}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise InputError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (tp is int and isinstance(value, float)
                                                                              and not value.is_integer()):
            raise InputError(f"{where}: expected {tp.__name__}, got {value!r}")
        if tp is float and not math.isfinite(value):
            raise InputError(f"{where}: expected a finite number, got {value!r}")
        return tp(value)
    if tp is dict or get_origin(tp) is dict:
        if not isinstance(value, dict):
            raise InputError(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, (list, dict)):
            raise InputError(f"{where}: expected a single value, got {value!r}")
        return str(value)
    return value
