"""--retry-failed: the rows whose status is transient, planned again as a new ingest (Dask tasks over the manifest's
files; the client holds their counts, not their rows)."""
from __future__ import annotations

import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..core import storage
from ..core.io import atomic_path, now, read_parquet_table, write_json
from .clean import hosts
from .dataset import Layout, write_replaced
from .format import MANIFEST_COLUMNS
from .plan import plan_shards
from .read import EXTRA
from .reader import manifest_files
from .status import TRANSIENT


def retry_rows(path: str, index: int, out: str, replaced: str) -> dict:
    """Dask task: the rows of one manifest file whose status is transient, as rows to download again (`out`, as
    plan_shards reads them; `file` is the manifest file's index) and as (key, shard of the earlier plan) for the
    finalize to leave them to the new shard (`replaced`). Returns their count per status."""
    import pyarrow.feather as feather

    base = ["key", "url", "caption", "source", "source_row", "status", "shard"]
    import pyarrow.parquet as pq

    extra = [c for c in pq.read_schema(path).names if c not in MANIFEST_COLUMNS]  # --save-additional-columns
    t = read_parquet_table(path, columns=base + extra)
    t = t.filter(pc.is_in(t.column("status"), value_set=pa.array(TRANSIENT, pa.string())))
    counts = pd.Series(t.column("status").to_numpy(zero_copy_only=False)).value_counts().to_dict()
    if not t.num_rows:
        return {}
    url = t.column("url").cast(pa.string())
    rows = pa.table({"url": url, "caption": t.column("caption").cast(pa.string()),
                     "key": t.column("key").cast(pa.string()), "source": t.column("source").cast(pa.string()),
                     "source_row": t.column("source_row").cast(pa.int64()),
                     "host": hosts(url, np.ones(t.num_rows, bool)),
                     "file": pa.array(np.full(t.num_rows, index, np.int64)),
                     **{EXTRA + c: t.column(c).cast(pa.string()) for c in extra}})
    storage.ensure_parent(out)
    with atomic_path(out) as tmp:
        feather.write_feather(rows, tmp, compression="uncompressed")
    write_replaced(replaced, pd.DataFrame({"key": t.column("key").to_numpy(zero_copy_only=False),
                                           "shard": t.column("shard").to_numpy(zero_copy_only=False)}))
    return {str(k): int(v) for k, v in counts.items()}


def plan_retry(client, layout: Layout, shard_size: int) -> dict | None:
    """A new ingest of the rows whose status is transient, planned as Dask tasks over the manifest's files (the
    client holds their counts, not their rows), with replaced/ (key, shard of the earlier plan; one file per manifest
    file with transient rows, named as that file: replaced/shard-NNNNN.parquet holds shard NNNNN's rows, so a
    finalize task reads its shard's file alone). Returns its figures, or None when no row is transient."""
    files = manifest_files(layout.root)
    ingest = (layout.ingest_ids() or [-1])[-1] + 1
    final = storage.join(layout.ingests, f"{ingest:05d}")
    folder = storage.staging_dir(final)
    work = storage.join(layout.work, "retry")
    tok = uuid.uuid4().hex[:8]
    storage.rmtree(work)
    storage.makedirs(storage.join(folder, "replaced"))
    canon = [storage.join(work, "canon", f"{i:05d}.arrow") for i in range(len(files))]
    counts = client.gather([client.submit(retry_rows, path, i, canon[i],
                                          storage.join(folder, "replaced", path.rsplit("/", 1)[-1]), pure=False,
                                          key=f"retry-{tok}-{i}") for i, path in enumerate(files)])
    pending = [sum(c.values()) for c in counts]
    statuses: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            statuses[k] = statuses.get(k, 0) + v
    if not sum(pending):
        storage.rmtree(folder)
        storage.rmtree(work)
        return None
    shard_counts = plan_shards(client, layout, canon, pending, shard_size, folder, work, tok)
    write_json(storage.join(folder, "inputs.json"), {"kind": "retry", "created_at": now(), "files": []})
    storage.publish_dir(folder, final, last="inputs.json")
    storage.rmtree(work)
    return {"ingest": ingest, "pending": sum(pending), "shards": len(shard_counts), "statuses": statuses}
