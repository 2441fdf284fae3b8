"""psdclip index query: text->image, image->image, image->text from the command line."""
from __future__ import annotations

import json

import numpy as np

from psdclip.pipeline.errors import InputError

from .config import QueryConfig


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
