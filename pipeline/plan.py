"""The global stages of an ingest: duplicate URLs, host spreading, shard assignment (keys: keys.py).

They need every row at once, so they run on small numeric columns on the client after the per-partition
Dask stages. Keys are stable: the first occurrence of a URL is keyed by a hash of the URL itself, every
other row by a hash of (source file, row) - a rerun on the same inputs gives the same keys, and the same
URL gets the same key in any dataset.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa

from .keys import add_url_keys, row_keys
from .status import DUPLICATE_URL, PENDING


def _h64(values) -> np.ndarray:
    return pd.util.hash_pandas_object(pd.Series(values, dtype=object), index=False).to_numpy()

def mark_duplicates(df: pd.DataFrame, existing_keys=frozenset()) -> pd.DataFrame:
    """Mark every pending row whose URL was seen before (earlier in input order, or already in the
    dataset) as duplicate_url, and assign keys to all rows."""
    df = df.copy(deep=False)
    status = df["status"].to_numpy(dtype=object).copy()
    error = df["error"].to_numpy(dtype=object).copy()
    pending = status == PENDING
    if "ukey" not in df:  # the clean stage computes it on the workers
        df = add_url_keys(df)
    ukeys = df["ukey"].to_numpy(dtype=object)
    dup_in_batch = np.zeros(len(df), dtype=bool)
    if pending.any():
        dup_in_batch[pending] = pd.Series(ukeys[pending]).duplicated(keep="first").to_numpy()
    keys = np.empty(len(df), dtype=object)
    canon = pending & ~dup_in_batch
    keys[canon] = ukeys[canon]
    if existing_keys:
        seen = np.fromiter((k in existing_keys for k in keys[canon]), dtype=bool, count=int(canon.sum()))
        idx = np.flatnonzero(canon)[seen]
        canon[idx] = False
        dup_in_batch[idx] = True
    other = ~canon
    keys[other] = row_keys(df["source"].to_numpy()[other], df["source_row"].to_numpy()[other])
    df = df.drop(columns=["ukey"])
    df["key"] = pd.arrays.ArrowStringArray(pa.array(keys, type=pa.large_string()))
    dup = dup_in_batch & pending
    status[dup] = DUPLICATE_URL
    error[dup] = "URL already listed earlier or already in the dataset"
    df["status"] = status
    df["error"] = error
    return df


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
