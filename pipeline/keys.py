"""Stable row keys, a per-partition stage (it runs on the Dask workers). The first occurrence of a URL is keyed
by a hash of the URL itself, every other row by a hash of (source file, row): a rerun on the same inputs gives
the same keys, and the same URL gets the same key in any dataset."""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from .status import PENDING

KEY_BYTES = 10  # 20 hex characters: collisions are out of reach at web scale


def url_keys(urls) -> list[str]:
    """The key of a URL's first occurrence: a hash of the URL itself."""
    b2 = hashlib.blake2b
    return [b2(u.encode(), digest_size=KEY_BYTES).hexdigest() for u in urls]


def url_key(url: str) -> str:
    return url_keys([url])[0]


def row_keys(sources, rows) -> list[str]:
    """The key of every other row: a hash of (source file, row number)."""
    b2 = hashlib.blake2b
    return [b2(f"\x00row\x00{s}\x00{r}".encode(), digest_size=KEY_BYTES).hexdigest() for s, r in zip(sources, rows)]


def add_url_keys(df: pd.DataFrame) -> pd.DataFrame:
    """Hash the URL of every pending row (a Dask stage: it runs per partition, on the workers)."""
    pending = df["status"].to_numpy() == PENDING
    ukeys = np.full(len(df), "", dtype=object)
    ukeys[pending] = url_keys(df["url"].to_numpy(dtype=object)[pending])
    df = df.copy()
    df["ukey"] = ukeys
    return df
