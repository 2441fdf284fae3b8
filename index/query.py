"""psdclip index query: text->image, image->image, image->text from the command line."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from psdclip.pipeline.errors import InputError


@dataclass
class QueryConfig:
    """psdclip index query: nearest neighbours of a text, an image or an embedding."""

    index: str = field(default="", metadata={"help": "index directory", "positional": True})
    text: str = field(default="", metadata={"help": "query text"})
    image: str = field(default="", metadata={"help": "query image file"})
    embedding: str = field(default="", metadata={"help": "query embedding (.npy file)"})
    k: int = field(default=10, metadata={"help": "results", "flag": "-k"})
    modality: str = field(default="image", metadata={"help": "what to search: image (images) or text (captions)"})
    dedupe: bool = field(default=False, metadata={"help": "remove near-identical results"})
    json: bool = field(default=False, metadata={"help": "print JSON"})

    def __post_init__(self):
        if not self.index:
            raise InputError("INDEX is required")
        if sum(bool(x) for x in (self.text, self.image, self.embedding)) != 1:
            raise InputError("give exactly one of --text, --image or --embedding")
        if not 1 <= self.k <= 10_000:
            raise InputError(f"-k must be in [1, 10000], got {self.k}")
        if self.modality not in ("image", "text"):
            raise InputError(f"--modality must be image or text, got {self.modality!r}")


def cmd_query(cfg: QueryConfig) -> int:
    from PIL import Image, UnidentifiedImageError

    from .searcher import Searcher

    s = Searcher(cfg.index)
    kw = {}
    if cfg.text:
        kw["text"] = cfg.text
    elif cfg.image:
        try:
            kw["image"] = Image.open(cfg.image)
        except (OSError, UnidentifiedImageError) as err:
            raise InputError(f"--image {cfg.image}: cannot read it as an image ({err})") from None
    else:
        try:
            kw["embedding"] = np.load(cfg.embedding)
        except (OSError, ValueError) as err:
            raise InputError(f"--embedding {cfg.embedding}: not a .npy array ({err})") from None
    try:
        results = s.search(k=cfg.k, modality=cfg.modality, dedupe=cfg.dedupe, **kw)
    except ValueError as err:
        raise InputError(str(err)) from None
    if cfg.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            print(f"{r['rank']:>3}  {r['score']:.4f}  {r['key']}  {r['caption'][:70]}")
    return 0
