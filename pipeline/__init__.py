"""psdclip.pipeline: URL lists -> Dask stages -> img2dataset -> shards + manifest + subsets.

The stage imports neither psdclip.train nor psdclip.index.
"""
import os as _os

# albumentations (used by img2dataset) would otherwise look for updates online at import time
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from ..core.errors import PsdclipError, InputError

__all__ = ["PsdclipError", "InputError"]
