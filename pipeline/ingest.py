"""Ingest new URL lists as Dask tasks over partitions: the client holds O(parts + buckets + shards) state, never rows.

    parts     each input file is cut into parts: byte ranges of an uncompressed txt/csv/tsv/jsonl file (cut just
              after a line end; a CSV cut that falls inside a quoted field is found and that file is read whole),
              row groups of a Parquet file, the whole of a compressed file. The client only seeks to each cut.
    read      a task per part reads and cleans its rows and sends each to one of B buckets: pending rows by their
              URL key (so that rows with equal URLs meet in one bucket), other rows by position. One Arrow IPC
              file per part, a record batch per bucket.
    dedupe    a task per bucket takes its batch from every part, in input order (file, row): a pending URL listed
              earlier in this ingest or taken by an earlier ingest (its key store, bucketed the same way) becomes
              duplicate_url; rows keep the keys of keys.py; rows that reach no shard are written as this ingest's
              manifest part for the bucket; the bucket's new URL keys join the ingest's key store.
    deal      the client turns the buckets' counts into offsets; a task per bucket sorts its rows by host and deals
              them round-robin over the ingest's shards from its offset (shard sizes differ by at most one; a host's
              rows of one bucket land on consecutive shards), one IPC file, a record batch per group of shards.
    group     a task per group of shards takes its batch from every bucket and writes each shard's input file, rows
              interleaved by host (a host's first row in the shard, then its second, ...). (deal and group: plan.py)

Everything is written into a temporary ingest folder that is renamed into _state/ingests/ at the end (on an object
store: written in place, its inputs.json last; storage.staging_dir): an ingest exists whole or not at all. Same outputs as one process reading every row would give: the same keys and
statuses for every row (tested against the in-memory reference).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..core import logs
from .plan import plan_shards
from .buckets import FINE, bucket_range, fine_buckets, pow2, read_batch, worker_count, write_batches
from .clean import clean_partition
from .parts import Part, file_sha256, header, part_bytes, size_of, split_file
from ..core import storage
from .format import manifest_schema
from .read import EXTRA
from .dataset import Layout
from ..core.io import atomic_path, now, read_feather, write_json
from ..core.errors import InputError
from .keys import row_keys
from .read import detect_format, read_parquet_list, read_url_list
from .status import DUPLICATE_URL, PENDING

log = logs.get(__name__, "[psdclip data build] ")

BUCKET_BYTES = 64 << 20  # one bucket per this many input bytes (a power of two >= the workers, <= FINE)


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """What a read task needs of the build's options."""
    input_format: str | None
    url_col: str
    caption_col: str
    max_caption_length: int
    column_names: list | None
    local_root: str = ""
    extra: tuple = ()  # --save-additional-columns

    @classmethod
    def of(cls, cfg) -> "ReadOptions":
        return cls(input_format=cfg.input_format, url_col=cfg.url_col, caption_col=cfg.caption_col,
                   max_caption_length=cfg.max_caption_length, column_names=cfg.column_names or None,
                   local_root=cfg.local_root, extra=tuple(cfg.save_additional_columns))


PART_SCHEMA = pa.schema([("url", pa.string()), ("caption", pa.string()), ("status", pa.string()),
                         ("error", pa.string()), ("row", pa.int64()), ("ukey", pa.string()), ("host", pa.string())])


def part_schema(extra=()) -> pa.Schema:
    """A read task's rows: PART_SCHEMA, then the additional columns (EXTRA + name, text)."""
    return pa.schema(list(PART_SCHEMA) + [(EXTRA + c, pa.string()) for c in extra])


def read_part(part: Part, opts: ReadOptions, buckets: int, out: str) -> dict:
    """Dask task: read and clean one part, write its rows to `out` (a batch per bucket). Returns small figures:
    rows, the part's sha256 when it is the whole file, its count of '"' (a CSV cut must not fall inside a quoted
    field), or the InputError as a value (so that the worker does not log it as a failed computation)."""
    try:
        if part.fmt == "parquet" and part.count > 1:
            df = read_parquet_list(part.path, opts.url_col, opts.caption_col, row_groups=part.row_groups,
                                   extra=opts.extra)
            raw = b""
        else:
            raw = part_bytes(part)
            names = opts.column_names
            if part.fmt in ("csv", "tsv") and part.index > 0 and not names:
                names = header(part)
            df = read_url_list(part.path, opts.input_format or part.fmt, opts.url_col, opts.caption_col, raw=raw,
                               column_names=names, extra=opts.extra)
    except InputError as err:
        return {"error": err, "quotes": 0}
    df = clean_partition(df, opts.max_caption_length, opts.local_root)
    status = df["status"].to_numpy(dtype=object)
    pending = status == PENDING
    rows = np.arange(len(df), dtype=np.int64)
    ukey = df["ukey"].to_numpy(dtype=object)
    bucket = rows % buckets
    if pending.any():
        bucket[pending] = fine_buckets(ukey[pending]) * buckets // FINE
    table = pa.table({"url": pa.array(df["url"].array, pa.string()), "caption": pa.array(df["caption"].array, pa.string()),
                      "status": pa.array(status, pa.string()), "error": pa.array(df["error"].to_numpy(dtype=object), pa.string()),
                      "row": pa.array(rows), "ukey": pa.array(ukey, pa.string()),
                      "host": pa.array(df["host"].array, pa.string()),
                      **{EXTRA + c: pa.array(df[EXTRA + c].array, pa.string()) for c in opts.extra}},
                     schema=part_schema(opts.extra))
    write_batches(out, table, bucket, buckets)
    return {"error": None, "rows": len(df), "sha": hashlib.sha256(raw).hexdigest() if part.count == 1 else None,
            "quotes": raw.count(b'"') if part.fmt in ("csv", "tsv") else 0}


@dataclasses.dataclass(frozen=True)
class PartRef:
    """A read task's output as a dedupe task sees it: where, which input file (its place in input order), and
    the file's row number of the part's first row."""
    out: str
    file: int
    source: str
    first_row: int


def _earlier_keys(key_dirs: list[str], lo: int, hi: int) -> pa.Array:
    """The URL keys in key buckets [lo, hi) that earlier ingests took (files keys/LLL-HHH.arrow)."""
    found = []
    for d in key_dirs:
        for name in storage.listdir(d):
            if not name.endswith(".arrow"):
                continue
            a, b = (int(x, 16) for x in name[:-6].split("-"))
            if b <= lo or a >= hi:
                continue
            keys = read_feather(storage.join(d, name), columns=["key"]).column("key").combine_chunks()
            if a < lo or b > hi:
                fine = fine_buckets(keys.to_numpy(zero_copy_only=False))
                keys = keys.filter(pa.array((fine >= lo) & (fine < hi)))
            found.append(keys)
    return pa.concat_arrays(found) if found else pa.array([], pa.string())


def dedupe_bucket(j: int, buckets: int, parts: list[PartRef], key_dirs: list[str], ingest: int, folder: str,
                  out: str) -> dict:
    """Dask task: bucket j of every part in input order; duplicate URLs (here or in earlier ingests), keys, this
    bucket's manifest rows that reach no shard (FOLDER/unsharded/JJJJ.parquet), its new URL keys
    (FOLDER/keys/LLL-HHH.arrow) and its rows to download (`out`). Returns the counts."""
    import pyarrow.feather as feather
    import pyarrow.parquet as pq

    pieces = []
    for i, ref in enumerate(parts):
        t = read_batch(ref.out, j)
        if t.num_rows:
            pieces.append(t.append_column("file", pa.array(np.full(t.num_rows, ref.file, np.int64)))
                           .append_column("part", pa.array(np.full(t.num_rows, i, np.int64)))
                           .set_column(4, "row", pc.add(t.column("row"), ref.first_row)))
    lo, hi = bucket_range(j, buckets)
    empty = pa.table({n: pa.array([], PART_SCHEMA.field(n).type) for n in PART_SCHEMA.names}).append_column(
        "file", pa.array([], pa.int64())).append_column("part", pa.array([], pa.int64()))
    table = pa.concat_tables(pieces) if pieces else empty
    order = np.lexsort((table.column("row").to_numpy(), table.column("file").to_numpy()))  # input order
    table = table.take(pa.array(order))
    extras = [c for c in table.column_names if c.startswith(EXTRA)]
    status = table.column("status").to_numpy(zero_copy_only=False).astype(object)
    error = table.column("error").to_numpy(zero_copy_only=False).astype(object)
    ukey = table.column("ukey")
    pending = status == PENDING
    first = np.zeros(len(status), dtype=bool)
    if pending.any():
        first[pending] = ~pd.Series(ukey.filter(pa.array(pending)).to_numpy(zero_copy_only=False)).duplicated().to_numpy()
    earlier = _earlier_keys(key_dirs, lo, hi)
    if len(earlier) and first.any():
        first &= ~pc.is_in(ukey, value_set=earlier).to_numpy(zero_copy_only=False)
    dup = pending & ~first
    status[dup] = DUPLICATE_URL
    error[dup] = "URL already listed earlier or already in the dataset"
    sources = np.array([p.source for p in parts], dtype=object)
    src = sources[table.column("part").to_numpy()] if len(parts) else np.array([], dtype=object)
    rows = table.column("row").to_numpy()
    keys = ukey.to_numpy(zero_copy_only=False).astype(object)
    keys[~first] = row_keys(src[~first], rows[~first])
    storage.makedirs(storage.join(folder, "keys"))
    rest = np.flatnonzero(~first)
    if len(rest):
        storage.makedirs(storage.join(folder, "unsharded"))
        na = pa.nulls(len(rest), pa.int64())
        cols = {"key": pa.array(keys[rest], pa.string()), "url": table.column("url").take(rest),
                "caption": table.column("caption").take(rest), "status": pa.array(status[rest], pa.string()),
                "error": pa.array(error[rest], pa.string()), "shard": na, "offset": na, "size": na, "width": na,
                "height": na, "original_width": na, "original_height": na,
                "sha256": pa.array([""] * len(rest), pa.string()), "source": pa.array(src[rest], pa.string()),
                "source_row": pa.array(rows[rest]), "ingest": pa.array(np.full(len(rest), ingest, np.int64))}
        cols.update({c[len(EXTRA):]: table.column(c).take(rest) for c in extras})
        schema = manifest_schema([c[len(EXTRA):] for c in extras])
        with atomic_path(storage.join(folder, "unsharded", f"{j:04d}.parquet"), hidden=True) as tmp:
            pq.write_table(pa.table([cols[c] for c in schema.names], schema=schema), tmp)
    take = np.flatnonzero(first)
    new = pa.table({"url": table.column("url").take(take), "caption": table.column("caption").take(take),
                    "key": pa.array(keys[take], pa.string()), "source": pa.array(src[take], pa.string()),
                    "source_row": pa.array(rows[take]), "host": table.column("host").take(take),
                    "file": table.column("file").take(take),
                    **{c: table.column(c).take(take) for c in extras}})
    if len(take):
        with atomic_path(storage.join(folder, "keys", f"{lo:03x}-{hi:03x}.arrow")) as tmp:
            feather.write_feather(new.select(["key"]), tmp, compression="uncompressed")
    storage.ensure_parent(out)
    with atomic_path(out) as tmp:
        feather.write_feather(new, tmp, compression="uncompressed")
    counts = pd.Series(status).value_counts().to_dict()
    return {"pending": int(len(take)), "statuses": {str(k): int(v) for k, v in counts.items()}}


def write_key_store(root: str, ingest: int, buckets: int) -> None:
    """Dask task, for an ingest written before key stores: its URL keys (the rows that reached a shard) bucketed
    as a new ingest writes them."""
    import pyarrow.feather as feather

    layout = Layout(root)
    folder = storage.join(layout.ingests, f"{ingest:05d}")
    keys = np.asarray(layout.load_sharded_plan(ingest)["key"].astype(str).to_numpy(), dtype=object)
    tmp = storage.tmp_name(storage.join(folder, "keys"), False)
    storage.makedirs(tmp)
    bucket = fine_buckets(keys) * buckets // FINE if len(keys) else np.array([], np.int64)
    for j in np.unique(bucket):
        lo, hi = bucket_range(int(j), buckets)
        with atomic_path(storage.join(tmp, f"{lo:03x}-{hi:03x}.arrow")) as path:
            feather.write_feather(pa.table({"key": pa.array(keys[bucket == j], pa.string())}), path,
                                  compression="uncompressed")
    storage.publish_dir(tmp, storage.join(folder, "keys"))


def ingest_inputs(client, layout: Layout, cfg) -> dict | None:
    """Read, clean, dedupe and plan every new input file as Dask tasks, and save the plan as a new ingest. Files
    already ingested (same bytes) are skipped. Returns the ingest's figures, or None when there was nothing new."""
    known = {i["sha256"]: i["path"] for ing in layout.ingest_ids() for i in layout.load_inputs(ing)["files"]}
    workers = worker_count(client)
    opts = ReadOptions.of(cfg)
    sizes = [size_of(p) for p in cfg.inputs]
    buckets = min(FINE, pow2(max(workers, math.ceil(sum(sizes) / BUCKET_BYTES))))
    work = storage.join(layout.work, "ingest")
    tok = uuid.uuid4().hex[:8]  # task keys unique to this build (a shared cluster may hold an earlier build's)
    files = []
    for i, (path, size) in enumerate(zip(cfg.inputs, sizes)):
        fmt = detect_format(path, cfg.input_format)
        parts = split_file(path, fmt, size, workers)
        futs = [client.submit(read_part, p, opts, buckets, storage.join(work, "parts", f"{i:05d}-{p.index:04d}.arrow"),
                              pure=False, key=f"read-{tok}-{i}-{p.index}") for p in parts]
        sha = (client.submit(file_sha256, path, pure=False, key=f"sha256-{tok}-{i}")
               if len(parts) > 1 else None)
        files.append([path, fmt, parts, futs, sha])
    ingest = (layout.ingest_ids() or [-1])[-1] + 1
    taken, refs, file_info, empty = set(), [], [], []
    for i, (path, fmt, parts, futs, sha) in enumerate(files):
        results = [f.result() for f in futs]
        bad = next((r["error"] for r in results if r["error"] is not None), None)
        quotes = np.cumsum([r["quotes"] for r in results])[:-1]
        if len(parts) > 1 and (bad is not None or (quotes % 2).any()):
            # a cut inside a quoted field, or bad input: the file read whole gives its rows or its exact error
            whole = Part(path, fmt, 0, 1)
            out = storage.join(work, "parts", f"{i:05d}-whole.arrow")
            results = [client.submit(read_part, whole, opts, buckets, out, pure=False,
                                     key=f"read-whole-{tok}-{i}").result()]
            parts, outs = [whole], [out]
            bad = results[0]["error"]
        else:
            outs = [storage.join(work, "parts", f"{i:05d}-{p.index:04d}.arrow") for p in parts]
        if bad is not None:
            raise bad
        digest = sha.result() if len(parts) > 1 else results[0]["sha"]
        if digest is None:
            raise InputError(f"{path}: cannot read it whole (it changed or became unreadable while being read)")
        rows = sum(r["rows"] for r in results)
        if digest in known or digest in taken:
            log.info(f"{path}: already ingested (same content as {known.get(digest, 'an earlier argument')}); skipped")
            continue
        taken.add(digest)
        if rows == 0:
            empty.append(path)
        elif fmt == "txt":
            log.warning(f"warning: {path}: a .txt list has no captions, so its {rows:,} rows get the empty_caption "
                        f"status (give a csv/tsv/parquet/jsonl list with a caption column)")
        first = 0
        for out, r in zip(outs, results):
            refs.append(PartRef(out, len(file_info), path, first))
            first += r["rows"]
        file_info.append({"path": path, "sha256": digest, "rows": rows})
    if not file_info:
        return None
    if not layout.ingest_ids() and not any(f["rows"] for f in file_info):
        raise InputError(f"{', '.join(f['path'] for f in file_info)}: no rows (empty or header-only lists): "
                         f"nothing to build")
    for path in empty:
        log.warning(f"warning: {path}: no rows (an empty or header-only list)")
    final = storage.join(layout.ingests, f"{ingest:05d}")
    folder = storage.staging_dir(final)
    storage.makedirs(folder)
    key_dirs = []
    for earlier in layout.ingest_ids():
        d = storage.join(layout.ingests, f"{earlier:05d}", "keys")
        if not storage.isdir(d):  # an ingest written before key stores: bucketed once
            client.submit(write_key_store, layout.root, earlier, buckets, pure=False,
                          key=f"keys-{tok}-{earlier}").result()
        key_dirs.append(d)
    log.info(f"ingest {ingest}: {sum(f['rows'] for f in file_info):,} rows read in {len(refs)} part(s); duplicate "
             f"URLs over {buckets} bucket(s)")
    # every dedupe task reads every part: the list goes to the workers once (scattered), not with each task
    refs_f, dirs_f = client.scatter([refs, key_dirs], broadcast=True, hash=False)
    dedupe = [client.submit(dedupe_bucket, j, buckets, refs_f, dirs_f, ingest, folder,
                            storage.join(work, "canon", f"{j:04d}.arrow"), pure=False, key=f"dedupe-{tok}-{j}")
              for j in range(buckets)]
    counts = client.gather(dedupe)
    pending = [c["pending"] for c in counts]
    total = sum(pending)
    statuses: dict[str, int] = {}
    for c in counts:
        for k, v in c["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    shard_counts = plan_shards(client, layout, [storage.join(work, "canon", f"{j:04d}.arrow") for j in range(buckets)],
                               pending, cfg.shard_size, folder, work, tok)
    write_json(storage.join(folder, "inputs.json"), {"kind": "urls", "created_at": now(), "files": file_info,
                                                     "buckets": buckets})
    storage.publish_dir(folder, final, last="inputs.json")
    storage.rmtree(work)
    rows = sum(f["rows"] for f in file_info)
    log.info(f"ingest {ingest}: {rows:,} rows from {len(file_info)} file(s); {total:,} to download in "
             f"{len(shard_counts)} shard(s)")
    return {"ingest": ingest, "rows": rows, "pending": total, "shards": len(shard_counts), "statuses": statuses}
