"""Shard assignment of a --retry-failed ingest (its rows: the transient failures, read back from the manifest).
A new list's rows are planned by the partitioned ingest (ingest.py), which deals each URL-key bucket the same way.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .status import PENDING


def _h64(values) -> np.ndarray:
    return pd.util.hash_pandas_object(pd.Series(values, dtype=object), index=False).to_numpy()


def assign_shards(df: pd.DataFrame, shard_size: int, first_shard: int) -> pd.DataFrame:
    """Spread each host's pending URLs round-robin over the partitions (one partition = one shard) and
    interleave hosts inside a partition, so that no host is hit by many requests at once."""
    df = df.copy(deep=False)
    shard_col = np.full(len(df), -1, dtype=np.int64)
    order_col = np.full(len(df), -1, dtype=np.int64)
    pending = np.flatnonzero(df["status"].to_numpy(dtype=object) == PENDING)
    n = len(pending)
    if n == 0:
        df["shard"], df["order"] = shard_col, order_col
        return df
    parts = max(1, math.ceil(n / shard_size))
    host_hash = _h64(df["host"].to_numpy()[pending])
    # deal the rows out round-robin, host after host: partitions differ in size by at most one and each
    # host's URLs land on consecutive partitions
    by_host = np.lexsort((np.arange(n), host_hash))
    part = np.empty(n, dtype=np.int64)
    part[by_host] = np.arange(n) % parts
    rank = pd.Series(host_hash).groupby(host_hash).cumcount().to_numpy()
    # inside a partition: round (rank // parts) first, then host, then input order
    order = np.lexsort((np.arange(n), host_hash, rank // parts, part))
    sorted_part = part[order]
    within = np.empty(n, dtype=np.int64)
    within[order] = np.arange(n) - np.searchsorted(sorted_part, sorted_part, side="left")
    shard = part + first_shard
    shard_col[pending] = shard
    order_col[pending] = within
    df["shard"], df["order"] = shard_col, order_col
    return df
