"""psdclip index query: text->image, image->image, image->text from the command line (the command, which prints the
results, is workflows.commands.cmd_query)."""
from __future__ import annotations

import numpy as np

from ..core.errors import InputError
from .config import QueryConfig
from .searcher import Searcher


def query(cfg: QueryConfig):
    """(searcher, results) of the query `cfg` describes."""
    from PIL import Image, UnidentifiedImageError

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
    return s, results
