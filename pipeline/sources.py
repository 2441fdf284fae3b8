"""The generated sources: one protocol, a registry, and the two sources behind it (the synthetic source, synth.py, and
the emoji real-image source, emoji.py). A source makes a folder of images and captions (generated, or fetched from
registry packages) with its ground truth (attributes.parquet) and held-out scenes (heldout/) beside them, described
by its own file (synth.json, emoji.json: what it was made from); it is served over loopback (serve.py) and turned
into a URL list for that address (`url_list`); its truth gives the oracle's groups (truth.py); its held-out scenes are
evaluated with a suite (eval's `synthetic:DIR`).

A recipe names a source by its section ([synthetic] or [emoji], its typed config); `psdclip data synth` and
`psdclip data emoji` make one. A new source is one module that defines `SOURCE = Source(...)` plus its name in
MODULES below. A folder of the user's own images is an input of `data build --local-root`, not a generated source
(folders.py)."""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
from dataclasses import dataclass
from typing import Callable

from ..core.errors import InputError

# recipe section -> (the module defining SOURCE, the file that describes a made source: what it was made from)
MODULES = {"synthetic": ("synth", "synth.json"), "emoji": ("emoji", "emoji.json")}


@dataclass(frozen=True)
class Source:
    name: str  # the recipe section, and the name in `psdclip data NAME`'s help
    config: type  # its typed config (pipeline/config.py)
    make: Callable  # (cfg) -> dict: generate or fetch the source into cfg.out
    groups: Callable  # (folder, by) -> DataFrame path, image_group, text_group: the ground truth (truth.py)
    suite: str = "synthetic"  # the eval suite kind its held-out scenes are evaluated with
    ignore: tuple[str, ...] = ("cache",)  # options that do not change what is made (a rerun may differ in them)

    @property
    def description(self) -> str:
        return MODULES[self.name][1]


def sources() -> dict[str, Source]:
    return {name: importlib.import_module(f"{__package__}.{module}").SOURCE for name, (module, _) in MODULES.items()}


def description_files() -> tuple[str, ...]:
    """synth.json, emoji.json: the files that describe a made source (without importing the sources)."""
    return tuple(description for _, description in MODULES.values())


def source_of(folder: str) -> Source:
    """The source a made folder holds (by its description file)."""
    for name, (_, description) in MODULES.items():
        if os.path.isfile(os.path.join(folder, description)):
            return sources()[name]
    raise InputError(f"{folder}: not a generated source (no {' or '.join(description_files())})")


def ensure(src: Source, cfg) -> str:
    """Make the source in cfg.out unless it is there; a folder made with other options is refused (one line).
    Returns the folder."""
    meta = os.path.join(cfg.out, src.description)
    if not os.path.isfile(meta):
        src.make(cfg)
        return cfg.out
    with open(meta, encoding="utf-8") as f:  # (not core.io: this module is read at the CLI's start, pandas is not)
        before = json.load(f).get("config", {})
    wanted = dataclasses.asdict(cfg)
    changed = sorted(k for k in wanted if k in before and before[k] != wanted[k] and k not in src.ignore)
    if changed:
        raise InputError(f"{cfg.out}: the {src.name} source was made with other options ({', '.join(changed)}); "
                         f"delete it (and the dataset built from it) or use another output folder")
    return cfg.out
