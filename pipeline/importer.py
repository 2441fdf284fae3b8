"""psdclip data import: an existing img2dataset output folder becomes a psdclip dataset without downloading again.

img2dataset writes, per shard, NNNNN.tar (webdataset output: <key>.jpg/.txt/.json of the successes) or NNNNN.parquet
holding the images (parquet output), beside NNNNN.parquet (webdataset output: one metadata row per input row, with
status and error_message) and NNNNN_stats.json. The import writes DATASET/ as a build would: manifest/ (one row per
input row, img2dataset's statuses mapped to ours by the same rules as a build's: failed_to_download -> http_4xx,
timeout, connection_error, ...; failed_to_resize -> not_image, image_too_large, ...), with each success's byte offset
in its tar; duplicate images (the same sha256) marked duplicate_image after the first in shard order; subsets,
stats.json, dataset.json. img2dataset's folder is never modified. Webdataset shards are hard-linked into
DATASET/shards/ when both folders are on one file system (no byte copied; the link shares the file, so do not edit
either), else copied (`--copy` always copies). Parquet shards are rewritten into psdclip's Arrow shard schema (key,
jpg, caption, url, sizes, sha256), successes only. Keys are img2dataset's own. Holds one shard's rows at a time: the
duplicate-image check sends each shard's successes (sha256, shard, row) to SHA_BUCKETS buckets by the hash's first
two hex digits (one Arrow IPC file per shard in DATASET/_work/, a record batch per bucket, as the build's finalize
does), then takes one bucket of every shard at a time, and rewrites the manifest of the shards that hold duplicates.
"""
from __future__ import annotations

import os
import re
import shutil
import tarfile
import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..core import storage
from ..core.errors import InputError
from ..core.locks import writer_lock
from ..core.io import now, write_json
from .buckets import read_batch, write_batches
from .config import ImportConfig
from .dataset import Layout
from .download import i2d_status
from .finalize import write_subsets
from .format import (
    MANIFEST_COLUMNS,
    MANIFEST_SCHEMA,
    SCHEMA_VERSION,
    image_of,
    manifest_file,
    shard_name,
    stats_name,
)
from .stats import stream_stats
from .status import DUPLICATE_IMAGE, SUCCESS
from .subsets import parse_subsets

SHA_BUCKETS = 256  # the first two hex digits of a sha256: a bucket of 1M successes is ~4k rows
_SHARD = re.compile(r"^(\d+)\.(tar|parquet)$")
ARROW_SCHEMA = pa.schema([("key", pa.string()), ("jpg", pa.binary()), ("caption", pa.string()), ("url", pa.string()),
                          ("width", pa.int32()), ("height", pa.int32()), ("original_width", pa.int32()),
                          ("original_height", pa.int32()), ("sha256", pa.string())])


def _shards(folder: str) -> tuple[str, list[int]]:
    """(output format, shard numbers) of an img2dataset folder."""
    names = os.listdir(folder)
    tars = sorted(int(m.group(1)) for m in map(_SHARD.match, names) if m and m.group(2) == "tar")
    pars = sorted(int(m.group(1)) for m in map(_SHARD.match, names) if m and m.group(2) == "parquet")
    if tars:
        return "webdataset", tars
    if pars:
        return "arrow", pars
    raise InputError(f"{folder}: not an img2dataset output folder (no NNNNN.tar or NNNNN.parquet shards)")


def _digits(folder: str, shard: int, ext: str) -> str:
    for width in range(5, 10):
        path = os.path.join(folder, f"{shard:0{width}d}.{ext}")
        if os.path.isfile(path):
            return path
    return os.path.join(folder, f"{shard:05d}.{ext}")


def _hash_file(layout: Layout, n: int) -> str:
    return os.path.join(layout.work, f"sha-{n}.arrow")


def _send_hashes(layout: Layout, n: int, frame: pd.DataFrame) -> None:
    """Shard n's successes with a hash, (sha256, shard, row), as one record batch per sha bucket."""
    ok = frame[(frame["status"] == SUCCESS) & (frame["sha256"].fillna("").astype(str).str.len() >= 2)]
    sha = ok["sha256"].astype(str).to_numpy()
    table = pa.table({"sha256": pa.array(sha, pa.string()), "shard": pa.array([n] * len(ok), pa.int64()),
                      "row": pa.array(ok.index.to_numpy(), pa.int64())})
    group = np.array([int(h[:2], 16) for h in sha], dtype=np.int64) if len(sha) else np.zeros(0, np.int64)
    write_batches(_hash_file(layout, n), table, group, SHA_BUCKETS)


def _duplicate_images(layout: Layout, shards: list[int]) -> dict[int, int]:
    """Mark duplicate_image every success whose sha256 an earlier success (in shard, row order) has: one bucket of
    every shard's hashes in memory at a time; the duplicates found are kept per shard as row numbers (8 bytes
    each) and the manifests of those shards rewritten. Returns the duplicates per shard."""
    dups: dict[int, list[np.ndarray]] = {}
    for b in range(SHA_BUCKETS):
        part = pa.concat_tables([read_batch(_hash_file(layout, n), b) for n in shards]).to_pandas()
        if part.empty:
            continue
        part = part.sort_values(["shard", "row"], kind="stable")
        for shard, rows in part[part.duplicated("sha256", keep="first")].groupby("shard")["row"]:
            dups.setdefault(int(shard), []).append(rows.to_numpy(np.int64))
    for n, parts in dups.items():
        rows = np.sort(np.concatenate(parts))
        path = manifest_file(layout.root, shard=n)
        frame = pq.read_table(path).to_pandas()
        frame.loc[rows, "status"] = DUPLICATE_IMAGE
        frame.loc[rows, "error"] = "same image bytes (sha256) as an earlier sample"
        pq.write_table(pa.Table.from_pandas(frame, schema=MANIFEST_SCHEMA, preserve_index=False), path)
    return {n: sum(len(p) for p in parts) for n, parts in dups.items()}


def import_folder(cfg: ImportConfig) -> dict:
    src = os.path.abspath(cfg.folder)
    if not os.path.isdir(src):
        raise InputError(f"{cfg.folder}: no such folder")
    fmt, shards = _shards(src)
    layout = Layout(cfg.out)
    lock = os.path.join("_state", "build.lock")
    if not _empty(layout.root, lock):
        raise InputError(f"--out {cfg.out}: not empty; import into a new folder")
    # one import (or build) writes a dataset at a time: the build's lock, then the folder still holds nothing else
    with writer_lock(layout.root, lock, "data import", "dataset"):
        if not _empty(layout.root, lock):
            raise InputError(f"--out {cfg.out}: not empty; import into a new folder")
        return _import(cfg, src, fmt, shards, layout)


def _empty(folder: str, lock: str) -> bool:
    """The folder is missing or holds nothing but the lock file `lock` (a path inside it)."""
    found = [os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files]
    return found in ([], [lock])


def _import(cfg: ImportConfig, src: str, fmt: str, shards: list, layout: Layout) -> dict:
    layout.create()
    os.makedirs(layout.manifest, exist_ok=True)
    counts, linked = {}, 0
    for n in shards:
        meta_path = _digits(src, n, "parquet")
        try:
            meta = pq.read_table(meta_path).to_pandas() if os.path.isfile(meta_path) else None
        except (OSError, pa.ArrowException) as err:
            raise InputError(f"{meta_path}: not a readable Parquet file ({str(err).splitlines()[0][:160]})") from None
        if meta is None:
            raise InputError(f"{src}: shard {n} has no {os.path.basename(meta_path)} (img2dataset's per-shard rows)")
        dest = os.path.join(layout.shards, shard_name(n, fmt))
        where: dict[str, tuple[int, int]] = {}
        if fmt == "webdataset":
            tar = _digits(src, n, "tar")
            try:
                with tarfile.open(tar) as t:
                    for m in t:
                        key, _, ext = m.name.partition(".")
                        if ext in ("jpg", "png", "webp", "jpeg") and key not in where:
                            where[key] = (m.offset_data, m.size)
            except (OSError, tarfile.TarError) as err:
                raise InputError(f"{tar}: not a readable tar ({err})") from None
            if cfg.copy:
                shutil.copyfile(tar, dest)
            else:
                try:
                    os.link(tar, dest)
                    linked += 1
                except OSError:
                    shutil.copyfile(tar, dest)
        rows = []
        images = []
        for i, r in enumerate(meta.to_dict("records")):
            status, error = i2d_status(r.get("status"), r.get("error_message"))
            key = str(r.get("key"))
            offset = size = None
            if status == SUCCESS:
                if fmt == "webdataset":
                    if key not in where:
                        status, error = "download_error", "img2dataset listed a success its tar does not hold"
                    else:
                        offset, size = where[key]
                else:
                    img = image_of(r)  # (img2dataset names the column by its encode format: jpg, png, webp)
                    if img is None:
                        status, error = "download_error", "img2dataset listed a success with no image bytes"
                    else:
                        offset, size = len(images), len(img)
                        images.append({"key": key, "jpg": img, "caption": r.get("txt") or r.get("caption") or "",
                                       **{c: r.get(c) for c in ARROW_SCHEMA.names if c not in ("key", "jpg", "caption")}})
            sha = r.get("sha256") or ""
            rows.append({"key": key, "url": r.get("url"), "caption": r.get("caption", r.get("txt")), "status": status,
                         "error": error, "shard": n, "offset": offset, "size": size,
                         **{c: r.get(c) for c in ("width", "height", "original_width", "original_height")},
                         "sha256": sha, "source": meta_path, "source_row": i, "ingest": 0})
        if fmt == "arrow":
            pq.write_table(pa.Table.from_pylist(images, schema=ARROW_SCHEMA), dest, row_group_size=256)
        frame = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
        for c in ("width", "height", "original_width", "original_height", "offset", "size", "source_row", "shard",
                  "ingest"):
            frame[c] = pd.array(pd.to_numeric(frame[c], errors="coerce"), dtype="Int64")
        table = pa.Table.from_pandas(frame, schema=MANIFEST_SCHEMA, preserve_index=False)
        pq.write_table(table, manifest_file(layout.root, shard=n))
        stats = meta_path[:-len(".parquet")] + "_stats.json"  # img2dataset's, named like its shard
        if os.path.isfile(stats):
            shutil.copyfile(stats, os.path.join(layout.shards, stats_name(n)))
        counts[n] = int((frame["status"] == SUCCESS).sum())
        _send_hashes(layout, n, frame)
    for n, dups in _duplicate_images(layout, shards).items():
        counts[n] -= dups
    storage.rmtree(layout.work)
    the_id = uuid.uuid4().hex[:16]
    specs = parse_subsets(cfg.subsets) if cfg.subsets else []
    write_subsets(layout, counts, specs, cfg.subset_seed, fmt, the_id)
    stats = stream_stats(layout.root, fmt)
    stats["build"] = {"finished_at": now(), "imported_from": src, "downloaded_rows": 0}
    write_json(layout.stats_json, stats)
    write_json(layout.dataset_json, {
        "schema_version": SCHEMA_VERSION, "id": the_id, "created_at": now(), "updated_at": now(),
        "output_format": fmt, "counts": {"rows": stats["rows"], "success": stats["success"], **stats["counts"]},
        "shards": sorted(s for s, c in counts.items() if c), "subsets": [list(s) for s in specs],
        "subset_seed": cfg.subset_seed,
        "config": {"imported_from": src, "img2dataset_format": "parquet" if fmt == "arrow" else "webdataset",
                   "shards": "copied" if fmt == "arrow" or cfg.copy or linked < len(shards) else "hard-linked"},
        "ingests": []})
    return {"rows": stats["rows"], "success": stats["success"], "shards": len(shards), "format": fmt,
            "linked": linked, "out": layout.root, "counts": stats["counts"]}
