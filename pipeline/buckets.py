"""The key buckets the Dask stages exchange rows through: a URL key's bucket, the Arrow IPC files with one record
batch per bucket (or per group of shards) that one task writes and others read batch by batch, and how many tasks
the workers get."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from ..core import storage
from ..core.io import atomic_path

FINE = 4096  # key buckets: the first 3 hex digits of a URL key; a bucket of an ingest is a range of them
GROUP_ROWS = 500_000  # rows per shard-writing task (at least two tasks per worker)


def worker_count(client) -> int:
    """The Dask workers the build's tasks spread over (at least 1)."""
    return max(1, len(client.scheduler_info().get("workers", {})))


def pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def fine_buckets(keys) -> np.ndarray:
    """The key bucket (0..FINE-1) of each URL key: its first three hex digits."""
    codes = np.asarray(keys, dtype="S3").view(np.uint8).reshape(-1, 3).astype(np.int64)
    codes = np.where(codes >= ord("a"), codes - ord("a") + 10, codes - ord("0"))
    return (codes[:, 0] << 8) | (codes[:, 1] << 4) | codes[:, 2]


def bucket_range(j: int, buckets: int) -> tuple[int, int]:
    return j * FINE // buckets, (j + 1) * FINE // buckets


def write_batches(path: str, table: pa.Table, group: np.ndarray, groups: int) -> None:
    """`table` as an Arrow IPC file with one record batch per group (rows of group g in batch g, in table order),
    so that a reader takes batch g alone."""
    order = np.argsort(group, kind="stable")
    bounds = np.searchsorted(group[order], np.arange(groups + 1))
    batch = table.take(pa.array(order)).combine_chunks()
    batch = batch.to_batches()[0] if batch.num_rows else pa.RecordBatch.from_pylist([], schema=table.schema)
    storage.ensure_parent(path)
    with atomic_path(path) as tmp:
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            for g in range(groups):
                writer.write_batch(batch.slice(int(bounds[g]), int(bounds[g + 1] - bounds[g])))


def read_batch(path: str, g: int) -> pa.Table:
    """Batch g of an IPC file of write_batches (memory-mapped when local; ranged reads of an object otherwise)."""
    if storage.is_remote(path):
        with storage.open_file(path) as f:
            return pa.Table.from_batches([pa.ipc.open_file(f).get_batch(g)])
    with pa.memory_map(path) as src:
        return pa.Table.from_batches([pa.ipc.open_file(src).get_batch(g)])
