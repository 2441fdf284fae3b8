"""Typed config fields: `option(help, default=...)` is a dataclass field whose help text the CLI shows (the command
table in workflows/cli.py generates the parser from the config dataclasses)."""
from __future__ import annotations

from dataclasses import field


def option(text: str, **kw):
    """A dataclass field with its --help text (`meta`: more metadata, e.g. {"positional": True})."""
    return field(metadata={"help": text, **kw.pop("meta", {})}, **kw)
