"""The shards of a new ingest, planned as Dask tasks: each bucket's rows to download are sorted by host and dealt
round-robin over the ingest's shards from the bucket's offset (shard sizes differ by at most one; a host's rows of one
bucket land on consecutive shards), then a task per group of shards writes each shard's input file, rows interleaved
by host. The client holds the buckets' counts, never rows. Used by a new list's ingest and by --retry-failed."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..core import storage
from ..core.io import atomic_path, read_feather, write_json
from .buckets import GROUP_ROWS, read_batch, worker_count, write_batches
from .dataset import SHARD_INPUT_COLUMNS, Layout
from .read import EXTRA


def _host_hash(hosts) -> np.ndarray:
    return pd.util.hash_array(np.asarray(hosts, dtype=object), categorize=False)


def deal_bucket(path: str, offset: int, shards: int, groups: int, out: str) -> None:
    """Dask task: a bucket's rows to download, sorted by host (then input order), dealt round-robin over the
    ingest's `shards` shards from `offset`; written as one batch per group of shards."""
    t = read_feather(path)
    hh = _host_hash(t.column("host").to_numpy(zero_copy_only=False))
    order = np.lexsort((t.column("source_row").to_numpy(), t.column("file").to_numpy(), hh))
    shard = np.empty(len(order), dtype=np.int64)
    shard[order] = (offset + np.arange(len(order), dtype=np.int64)) % shards
    t = t.append_column("shard", pa.array(shard)).append_column("host_hash", pa.array(hh))
    write_batches(out, t, shard * groups // shards, groups)


def write_group(g: int, dealt: list[str], first_shard: int, folder: str) -> dict:
    """Dask task: the input file of every shard of group g, from every bucket's batch g: a shard's rows ordered by
    round (a host's first row in the shard, then its second, ...), then host, then input order."""
    import pyarrow.feather as feather

    pieces = [t for t in (read_batch(p, g) for p in dealt) if t.num_rows]
    if not pieces:
        return {}
    t = pa.concat_tables(pieces)
    shard, hh = t.column("shard").to_numpy(), t.column("host_hash").to_numpy()
    rank = pd.DataFrame({"s": shard, "h": hh}).groupby(["s", "h"]).cumcount().to_numpy()
    order = np.lexsort((t.column("source_row").to_numpy(), t.column("file").to_numpy(), hh, rank, shard))
    t = t.take(pa.array(order))
    t = t.set_column(t.schema.get_field_index("source"), "source", pc.dictionary_encode(t.column("source")))
    shard = shard[order]
    cuts = np.flatnonzero(np.diff(shard)) + 1
    counts = {}
    storage.makedirs(storage.join(folder, "shards"))
    for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(shard)]):
        s = int(shard[a]) + first_shard
        piece = t.slice(int(a), int(b - a)).rename_columns(
            ["psdclip_key" if n == "key" else n for n in t.column_names])
        piece = piece.select(SHARD_INPUT_COLUMNS + [c for c in piece.column_names if c.startswith(EXTRA)])
        with atomic_path(storage.join(folder, "shards", f"{s:05d}.arrow")) as tmp:
            feather.write_feather(piece, tmp, compression="uncompressed")
        counts[s] = int(b - a)
    return counts


def plan_shards(client, layout: Layout, canon: list[str], pending: list[int], shard_size: int, folder: str, work: str,
                tok: str) -> dict[int, int]:
    """The shards of a new ingest (in FOLDER, not yet renamed into place) from files of rows to download (`canon`,
    `pending` rows each: url, caption, key, source, source_row, host, file), as Dask tasks: each file's rows are
    dealt over the shards, sorted by host, then each group of shards' input files is written. Also writes
    shards.json and the keys/ and unsharded/ folders. Returns shard -> rows; the client holds no row."""
    workers = worker_count(client)
    total = sum(pending)
    shard_counts: dict[int, int] = {}
    if total:
        shards = math.ceil(total / shard_size)
        groups = min(shards, max(2 * workers, math.ceil(total / GROUP_ROWS)))
        offsets = np.r_[0, np.cumsum(pending)[:-1]]
        dealt = [storage.join(work, "dealt", f"{j:04d}.arrow") for j in range(len(canon))]
        client.gather([client.submit(deal_bucket, path, int(offsets[j]), shards, groups, dealt[j], pure=False,
                                     key=f"deal-{tok}-{j}")
                       for j, path in enumerate(canon) if pending[j]])
        dealt = [d for d, n in zip(dealt, pending) if n]
        first_shard = max(layout.planned_shards(upgrade=True), default=-1) + 1
        dealt_f = client.scatter([dealt], broadcast=True, hash=False)[0]
        for c in client.gather([client.submit(write_group, g, dealt_f, first_shard, folder, pure=False,
                                              key=f"group-{tok}-{g}") for g in range(groups)]):
            shard_counts.update(c)
    for d in ("keys", "unsharded"):  # (either may be empty)
        storage.makedirs(storage.join(folder, d))
    write_json(storage.join(folder, "shards.json"), {str(s): n for s, n in sorted(shard_counts.items())}, indent=0)
    return shard_counts
