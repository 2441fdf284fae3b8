"""psdclip index query: text->image, image->image, image->text from the command line."""
from __future__ import annotations

import json

import numpy as np

from ..core.errors import InputError

from .config import QueryConfig


def cmd_query(cfg: QueryConfig) -> int:
    from PIL import Image, UnidentifiedImageError

    from .searcher import Searcher

    s = Searcher(cfg.index)
    kw = {}
    if cfg.text:
        kw["text"] = cfg.text
    elif cfg.image:
        Image.MAX_IMAGE_PIXELS = cfg.max_image_pixels
        try:
            with Image.open(cfg.image) as im:
                if im.width * im.height > cfg.max_image_pixels:
                    raise InputError(f"--image {cfg.image}: {im.width}x{im.height} is over --max-image-pixels "
                                     f"{cfg.max_image_pixels:,} (a decompression bomb?)")
                im.draft("RGB", (1024, 1024))  # the model sees far fewer pixels: decode no more than needed
                im.load()
                im.thumbnail((1024, 1024))
                kw["image"] = im.convert("RGB")
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
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
            extra = "".join(f"  {c}={r[c]}" for c in s.extra if r.get(c) is not None)  # --save-additional-columns
            print(f"{r['rank']:>3}  {r['score']:.4f}  {r['key']}  {r['caption'][:70]}{extra}")
    return 0
