"""The end of a build as Dask tasks over groups of shards: the client holds O(shards + files + buckets), never rows.

    rows      a task per group of shards joins each shard's input file (its plan) with its download result into
              manifest rows (a key a later --retry-failed ingest planned again is left to that ingest's shard) and
              sends the successful rows' (sha256, input order, shard, key) to B buckets by sha256.
    images    a task per sha256 bucket: among rows with the same image bytes the first in input order (ingest,
              file, row) stays success, the others become duplicate_image (bytes kept in their shard); the
              duplicates go back to their group.
    write     a task per group writes manifest/shard-NNNNN.parquet of each of its shards (atomically, hidden
              temporary names) and returns the shard's success count.

Then each ingest's manifest rows that reach no shard are copied into manifest/ as they are (they were final when
planned), manifest files no row points at any more are removed, and the subsets are written from the success
counts (plus, for a subset's boundary shard, that shard's keys).
"""
from __future__ import annotations

import math
import os
import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..core import logs, storage
from ..core.io import atomic_path, read_feather, read_parquet_table, write_json
from .buckets import (
    FINE,
    GROUP_ROWS,
    fine_buckets,
    pow2,
    read_batch,
    worker_count,
    write_batches,
)
from .dataset import Layout, write_replaced
from .format import MANIFEST_COLUMNS, MANIFEST_SCHEMA, manifest_file, manifest_schema
from .read import EXTRA
from .reader import success_keys
from .status import DUPLICATE_IMAGE, PENDING, SUCCESS
from .subsets import build_subsets

J = storage.join
log = logs.get(__name__, "[psdclip data build] ")

RESULT_FIELDS = ["offset", "size", "width", "height", "original_width", "original_height"]
IMAGE_SCHEMA = pa.schema([("sha256", pa.string()), ("ingest", pa.int64()), ("file", pa.int64()),
                          ("source_row", pa.int64()), ("shard", pa.int64()), ("key", pa.string())])


def _replaced_files(path: str, names: set | None, shard: int) -> list[str]:
    """The files of a retry ingest's replaced rows that may hold `shard`'s: replaced/shard-NNNNN.parquet alone (named
    after the manifest file it came from), plus files named otherwise (numbered, as retries wrote them before, or
    from a legacy manifest.parquet: any shard's rows); or a replaced.parquet (names None)."""
    if names is None:
        return [path]
    own = f"shard-{shard:05d}.parquet"
    return ([J(path, own)] if own in names else []) + [
        J(path, n) for n in sorted(names) if n.endswith(".parquet") and not n.startswith(("shard-", "ingest-", "."))]


def _shard_rows(layout: Layout, shard: int, ingest: int, path: str, file_order: dict,
                replaced: list[tuple[str, set | None]]) -> pd.DataFrame:
    """One shard's manifest rows: its plan (the shard input file) with its download result joined in, less the keys a
    later retry ingest planned again (`replaced`: (its replaced/ folder and file names, or a replaced.parquet))."""
    t = read_feather(path).to_pandas()
    t = t.rename(columns={"psdclip_key": "key"})
    t["source"] = t["source"].astype(str)
    for p in (f for r, names in replaced for f in _replaced_files(r, names, shard)):
        gone = read_parquet_table(p, columns=["key"], filters=[("shard", "=", shard)]).column("key").to_pylist()
        if gone:  # the later row is the manifest's
            t = t[~t["key"].isin(gone)]
    res_path = layout.result_path(shard)
    if storage.isfile(res_path):
        res = read_parquet_table(res_path).to_pandas()
        t = t.merge(res, on="key", how="left", validate="one_to_one")
        t["status"] = t["status"].fillna(PENDING).astype(str)
        t["error"] = t["error"].fillna("").astype(str)
        t["sha256"] = t["sha256"].fillna("").astype(str)
    else:  # planned, not downloaded
        t["status"], t["error"], t["sha256"] = PENDING, "", ""
        for c in RESULT_FIELDS:
            t[c] = pd.NA
    for c in RESULT_FIELDS:
        t[c] = pd.array(t[c], dtype="Int64")
    t["shard"] = pd.array(np.full(len(t), shard), dtype="Int64")
    t["ingest"] = pd.array(np.full(len(t), ingest), dtype="Int64")
    t["source_row"] = pd.array(t["source_row"], dtype="Int64")
    t["file"] = t["source"].map(file_order).fillna(len(file_order)).astype(np.int64)
    return t


def rows_pass(root: str, shards: list[tuple[int, int, str]], file_order: dict, replaced: dict, buckets: int,
              work: str, g: int) -> int:
    """Dask task: the manifest rows of a group of shards ((shard, ingest, input file) each) into WORK/rows-G.parquet,
    and its successful images by sha256 bucket into WORK/images-G.arrow."""
    layout = Layout(root)
    listed = {ing: (r, set(storage.listdir(r)) if storage.isdir(r) else None) for ing, r in replaced.items()}
    frames = [_shard_rows(layout, s, i, p, file_order, [v for ing, v in listed.items() if ing > i])
              for s, i, p in shards]
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    storage.makedirs(work)
    # --save-additional-columns: the inputs' extra columns, by their own names in the manifest
    extras = [c[len(EXTRA):] for c in rows.columns if c.startswith(EXTRA)]
    rows = rows.rename(columns={EXTRA + c: c for c in extras})
    cols = MANIFEST_COLUMNS + extras + ["file"]
    schema = manifest_schema(extras).append(pa.field("file", pa.int64()))
    rows_table = pa.Table.from_pandas(rows[cols], schema=schema, preserve_index=False) if len(rows) else schema.empty_table()
    with atomic_path(J(work, f"rows-{g:05d}.parquet")) as tmp:
        pq.write_table(rows_table, tmp)
    ok = rows_table.filter(pc.and_(pc.equal(rows_table.column("status"), SUCCESS),
                                   pc.not_equal(rows_table.column("sha256"), "")))
    images = ok.select(IMAGE_SCHEMA.names).cast(IMAGE_SCHEMA)
    bucket = (fine_buckets(images.column("sha256").to_numpy(zero_copy_only=False)) * buckets // FINE
              if images.num_rows else np.zeros(0, np.int64))
    write_batches(J(work, f"images-{g:05d}.arrow"), images, bucket, buckets)
    return len(rows)


def images_pass(b: int, groups: int, firsts: tuple, work: str) -> None:
    """Dask task: sha256 bucket b of every group; the rows that repeat an earlier row's image bytes, sent back to
    their groups (WORK/dups-B.arrow, a batch per group)."""
    pieces = [t for t in (read_batch(J(work, f"images-{g:05d}.arrow"), b) for g in range(groups))
              if t.num_rows]
    t = pa.concat_tables(pieces) if pieces else IMAGE_SCHEMA.empty_table()
    df = t.to_pandas()
    df = df.sort_values(["sha256", "ingest", "file", "source_row"], kind="stable")
    dups = df[df.duplicated("sha256", keep="first")]
    group = (np.searchsorted(np.asarray(firsts), dups["shard"].to_numpy(), side="right") - 1).astype(np.int64)
    out = pa.table({"shard": pa.array(dups["shard"].to_numpy(np.int64)), "key": pa.array(dups["key"], pa.string())})
    write_batches(J(work, f"dups-{b:05d}.arrow"), out, group, groups)


def write_pass(root: str, g: int, buckets: int, work: str, shards: tuple = ()) -> dict[int, int]:
    """Dask task: the group's manifest files, with its duplicate images marked. Returns shard -> success count. A
    shard of the group left with no row (a retry planned every one of them again) gets an empty file: its earlier
    file would otherwise still list them, beside the retry's rows."""
    rows = read_parquet_table(J(work, f"rows-{g:05d}.parquet")).to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)
    dups = [t for t in (read_batch(J(work, f"dups-{b:05d}.arrow"), g) for b in range(buckets)) if t.num_rows]
    if dups:
        d = pa.concat_tables(dups).to_pandas()
        hit = pd.MultiIndex.from_frame(rows[["shard", "key"]].astype({"shard": np.int64, "key": str})).isin(
            pd.MultiIndex.from_frame(d[["shard", "key"]]))
        rows.loc[hit, "status"] = DUPLICATE_IMAGE
        rows.loc[hit, "error"] = "same image bytes (sha256) as an earlier sample"
    # input order inside a file (ingest, file, row), as readers of one shard's file would list it
    rows = rows.sort_values(["ingest", "file", "source_row"], kind="stable")
    counts = {}
    extras = [c for c in rows.columns if c not in MANIFEST_COLUMNS and c != "file"]  # (--save-additional-columns)
    for shard, part in rows.groupby("shard", sort=True):
        table = pa.Table.from_pandas(part[MANIFEST_COLUMNS + extras], schema=manifest_schema(extras),
                                     preserve_index=False)
        with atomic_path(manifest_file(root, shard=int(shard)), hidden=True) as tmp:
            pq.write_table(table, tmp)
        counts[int(shard)] = int((part["status"] == SUCCESS).sum())
    for shard in set(shards) - set(counts):
        with atomic_path(manifest_file(root, shard=int(shard)), hidden=True) as tmp:
            pq.write_table(MANIFEST_SCHEMA.empty_table(), tmp)
        counts[int(shard)] = 0
    return counts


def _file_order(layout: Layout) -> dict[str, int]:
    order: dict[str, int] = {}
    for ingest in layout.ingest_ids():
        for f in layout.load_inputs(ingest).get("files", []):
            order.setdefault(f["path"], len(order))
    return order


def _replaced(layout: Layout, ingest: int) -> str:
    """A retry ingest's rows planned again: replaced/ (a Parquet file per manifest file with transient rows, named
    after it), or an older retry's replaced.parquet, each (key, shard of the earlier plan) sorted by shard; for a retry ingest
    written before either existed, found once by reading the earlier ingests' shard input files one at a time."""
    folder = J(layout.ingests, f"{ingest:05d}", "replaced")
    if storage.isdir(folder):
        return folder
    path = J(layout.ingests, f"{ingest:05d}", "replaced.parquet")
    if not storage.isfile(path):
        keys = pa.array(layout.load_sharded_plan(ingest)["key"].astype(str), pa.string())
        found = []
        for earlier in layout.ingest_ids():
            if earlier >= ingest:
                break
            for shard, (p, _) in layout.planned_shards_of(earlier).items():
                k = read_feather(p, columns=["psdclip_key"]).column("psdclip_key")
                hit = k.filter(pc.is_in(k, value_set=keys))
                if len(hit):
                    found.append(pd.DataFrame({"key": hit.to_pylist(), "shard": shard}))
        write_replaced(path, pd.concat(found, ignore_index=True) if found else pd.DataFrame(
            {"key": pd.Series(dtype=str), "shard": pd.Series(dtype=np.int64)}))
    return path


def finalize_manifest(client, layout: Layout) -> dict[int, int]:
    """manifest/ for every planned shard (tasks) and every ingest's unsharded rows (copied); returns the success
    count of every shard."""
    workers = worker_count(client)
    planned = []  # (shard, ingest, input file, rows)
    replaced = {}  # retry ingest -> its replaced.parquet (key, shard of the earlier plan)
    for ingest in layout.ingest_ids():
        for shard, (path, rows) in layout.planned_shards_of(ingest).items():
            planned.append((shard, ingest, path, rows))
        if layout.load_inputs(ingest).get("kind") == "retry":
            replaced[ingest] = _replaced(layout, ingest)
    planned.sort()
    total = sum(r for *_, r in planned)
    groups = max(1, min(len(planned), max(2 * workers, math.ceil(total / GROUP_ROWS))))
    cuts = [len(planned) * g // groups for g in range(groups + 1)]
    members = [[(s, i, p) for s, i, p, _ in planned[cuts[g]:cuts[g + 1]]] for g in range(groups)]
    firsts = tuple(m[0][0] if m else -1 for m in members)
    buckets = min(FINE, pow2(max(workers, math.ceil(total / GROUP_ROWS))))
    work = J(layout.work, "finalize")
    tok = uuid.uuid4().hex[:8]
    counts: dict[int, int] = {}
    storage.makedirs(layout.manifest)
    if planned:
        file_order = _file_order(layout)
        client.gather([client.submit(rows_pass, layout.root, members[g], file_order, replaced, buckets, work, g,
                                     pure=False, key=f"manifest-rows-{tok}-{g}") for g in range(groups)])
        client.gather([client.submit(images_pass, b, groups, firsts, work, pure=False,
                                     key=f"manifest-images-{tok}-{b}") for b in range(buckets)])
        for c in client.gather([client.submit(write_pass, layout.root, g, buckets, work,
                                              tuple(s for s, _, _ in members[g]), pure=False,
                                              key=f"manifest-write-{tok}-{g}") for g in range(groups)]):
            counts.update(c)
    keep = {os.path.basename(manifest_file(layout.root, shard=s)) for s, *_ in planned}
    present = {os.path.basename(p): n for p, n in storage.sizes(layout.manifest, "*.parquet").items()}
    listed: dict[str, dict[str, int]] = {}  # folder -> {file: bytes}: one listing per folder, not a request per file
    for ingest in layout.ingest_ids():  # the rows that reach no shard: each ingest's files, copied once
        for name, src in layout.unsharded_manifests(ingest):
            folder = src.rsplit("/", 1)[0]
            if folder not in listed:
                listed[folder] = storage.sizes(folder, "*.parquet")
            if name in present and present[name] == listed[folder].get(src):  # copied by an earlier build (such
                keep.add(name)                                                 # files never change once planned)
                continue
            fs, p = storage.arrow_filesystem(src)
            if not pq.ParquetFile(p, filesystem=fs).metadata.num_rows:  # nothing to copy
                continue
            keep.add(name)
            storage.copy(src, J(layout.manifest, name))
    for name in present:
        if name not in keep:
            storage.remove(J(layout.manifest, name))
    storage.remove(layout.legacy_manifest)
    storage.rmtree(work)
    return counts


def write_subsets(layout: Layout, counts: dict[int, int], specs, seed: int, fmt: str, dataset: str = "") -> None:
    """subsets/NAME.json from the shards' success counts; a boundary shard's keys are read from its manifest file."""
    if not specs:
        return
    names = {layout.shard_name(s, fmt): s for s, n in counts.items() if n}

    def keys_of(name: str) -> list[str]:
        return success_keys(layout.root, names[name]).tolist()

    docs = build_subsets({name: counts[s] for name, s in names.items()}, keys_of, specs, seed)
    for name, doc in docs.items():
        doc["dataset_id"] = dataset  # a subset copied into another dataset is refused there
        doc["shards"] = [f"shards/{s}" for s in doc["shards"]]
        if doc["boundary"]:
            doc["boundary"]["shard"] = f"shards/{doc['boundary']['shard']}"
        if doc["truncated"]:
            log.info(f"subset {name}: asked for {doc['requested']:,} samples, the dataset has {doc['count']:,}")
        write_json(J(layout.subsets, f"{name}.json"), doc)
