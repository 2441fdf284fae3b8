"""psdclip data build: the orchestration of the pipeline's stages on a Dask cluster.

    read + clean (Dask task per input file) -> keys, duplicate URLs, host spreading, shards (client)
    -> plan saved atomically -> download (Dask task per partition, img2dataset) -> result per shard
    -> duplicate images (Dask dataframe over the results) -> manifest/ (a file per shard), subsets, stats,
    dataset.json

A rerun first finishes every planned shard that has no result yet, so a crash at any point loses and
duplicates nothing; input files already ingested (recognised by content) are skipped; new ones append.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import os
import sys
import time

import numpy as np
import pandas as pd
import pyarrow as pa

from .clean import clean_partition, hosts
from .config import BuildConfig
from .dataset import SCHEMA_VERSION, Layout, assemble_manifest, now, read_json, stream_stats, write_json, \
    write_manifest, write_parquet
from .download import DownloadOptions, download_partition
from . import logs
from .errors import InputError, PsdclipError
from .plan import assign_shards, mark_duplicates
from .read import detect_format, read_source
from .status import DUPLICATE_IMAGE, PENDING, SUCCESS, TRANSIENT
from .subsets import build_subsets, parse_subsets

SPLIT_BYTES = 8 << 20  # URL lists larger than this are cleaned by several tasks
PLAN_COLUMNS = ["key", "url", "caption", "source", "source_row", "status", "error", "host", "shard", "order"]


log = logs.get(__name__, "[psdclip data build] ")


@contextlib.contextmanager
def dask_client(scheduler: str | None, n_workers: int, local_directory: str):
    """A client on the given scheduler, or on a LocalCluster of worker processes whose scratch space is
    inside the dataset folder (nothing is written outside it)."""
    from dask.distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as err:
            raise PsdclipError(f"--dask-scheduler {scheduler}: cannot connect ({err})") from None
        with client:
            yield client
        return
    os.makedirs(local_directory, exist_ok=True)
    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                           local_directory=local_directory, silence_logs=logging.ERROR)
    client = Client(cluster)
    try:
        yield client
    finally:
        # Our private cluster, everything already on disk: end the worker processes outright (a graceful
        # exit of a process that imported torch, through img2dataset's webdataset, takes ~1 s), then close.
        logging.getLogger("distributed").setLevel(logging.CRITICAL)  # the closing comms are expected
        for nanny in list(getattr(cluster, "workers", {}).values()):
            with contextlib.suppress(Exception):
                nanny.process.process.kill()
        with contextlib.suppress(Exception):
            client.close()
        with contextlib.suppress(Exception):
            cluster.close(timeout=5)


def _finished_by_rows(futures: dict, rows: dict, work: str, enabled: bool):
    """Yield the futures as they finish while a progress bar counts rows: those of finished shards plus what
    the shards in flight have written so far (their sample writers note it in _work/*/rows-done), so the bar
    moves on a job of a few large shards too."""
    from dask.distributed import as_completed
    from dask.distributed import wait as dask_wait

    if not enabled:
        yield from as_completed(futures)
        return
    from tqdm import tqdm

    bar = tqdm(total=sum(rows.values()), desc="download", unit="row", unit_scale=True, file=sys.stderr,
               dynamic_ncols=True)
    pending, finished = set(futures), 0
    try:
        while pending:
            try:
                done, pending = dask_wait(list(pending), timeout=0.5, return_when="FIRST_COMPLETED")
            except TimeoutError:  # nothing finished within the poll interval: refresh the bar from the files
                done = set()
            pending = set(pending)
            for fut in done:
                finished += rows[futures[fut]]
                yield fut
            in_flight = 0
            for path in glob.glob(os.path.join(work, "*", "rows-done")):
                with contextlib.suppress(OSError, ValueError):
                    with open(path) as f:
                        in_flight += int(f.read() or 0)
            bar.n = max(bar.n, min(bar.total, finished + in_flight))
            bar.refresh()
        bar.n = bar.total
        bar.refresh()
    finally:
        bar.close()


def build(cfg: BuildConfig) -> dict:
    """Run (or resume, or extend) a build. Returns the stats dict.

    If the output folder did not exist and the build stops on bad input before anything was planned,
    the folder is removed again; an existing dataset is never left changed by a failed read."""
    fresh = not os.path.exists(cfg.out)
    try:
        return _build(cfg)
    except InputError:
        layout = Layout(cfg.out)
        if fresh and os.path.isdir(layout.root) and not layout.ingest_ids():
            import shutil

            shutil.rmtree(layout.root, ignore_errors=True)
        raise


# options an existing dataset was built with that an append must keep (mixed shards otherwise)
FIXED_OPTIONS = ("image_size", "resize_mode", "encode_format", "encode_quality")


def _check_out(cfg: BuildConfig, layout: Layout, previous: dict | None) -> None:
    """Refuse an --out that is a file, or a non-empty folder that is not a psdclip dataset (its files would be
    overwritten), and an append whose image options differ from the dataset's."""
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise InputError(f"--out {cfg.out}: is a file, not a dataset directory")
    if os.path.isdir(cfg.out) and previous is None and not os.path.isdir(layout.state) and os.listdir(cfg.out):
        raise InputError(f"--out {cfg.out}: a non-empty folder that is not a psdclip dataset; choose a new or empty "
                         f"folder")
    if previous and previous.get("output_format") != cfg.format:
        raise InputError(f"{cfg.out}: the dataset holds {previous.get('output_format')} shards; "
                         f"cannot append with --format {cfg.format}")
    before = (previous or {}).get("config") or {}
    for name in FIXED_OPTIONS:
        if name in before and before[name] != getattr(cfg, name):
            raise InputError(f"{cfg.out}: the dataset was built with --{name.replace('_', '-')} {before[name]}; "
                             f"cannot append with {getattr(cfg, name)} (use a new --out)")


@contextlib.contextmanager
def _build_lock(layout: Layout):
    """One build at a time per dataset: an advisory lock the OS drops when the process ends, even by kill -9."""
    import fcntl

    path = os.path.join(layout.state, "build.lock")
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise InputError(f"{layout.root}: another `psdclip data build` ({holder}) is writing this dataset; "
                             f"wait for it to finish") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {os.uname().nodename}")
        f.flush()
        yield
    finally:
        f.close()


def _build(cfg: BuildConfig) -> dict:
    layout = Layout(cfg.out)
    previous = read_json(layout.dataset_json) if os.path.isfile(layout.dataset_json) else None
    _check_out(cfg, layout, previous)
    if not cfg.inputs and not cfg.retry_failed and not layout.ingest_ids():
        raise InputError("no URL list given (psdclip data build URL_LIST... --out DATASET)")
    layout.create()
    with _build_lock(layout):
        return _build_locked(cfg, layout, previous)


def _file_sha256(path: str) -> str | None:
    """sha256 of a URL list's (decompressed) bytes, as the read task computes it, streamed; None if unreadable."""
    import hashlib

    import fsspec

    h = hashlib.sha256()
    try:
        with fsspec.open(path, "rb", compression="infer") as f:
            for block in iter(lambda: f.read(8 << 20), b""):
                h.update(block)
    except (OSError, EOFError, ValueError):
        return None
    return h.hexdigest()


def _nothing_to_do(cfg: BuildConfig, layout: Layout, previous: dict | None) -> bool:
    """A rerun of a finished build on lists it already holds (a sweep or recipe run again): nothing to read, plan,
    download or rewrite, so no cluster is started."""
    if not previous or cfg.retry_failed or previous.get("schema_version") != SCHEMA_VERSION:
        return False
    if not os.path.isdir(layout.manifest) or not os.path.isfile(layout.stats_json):
        return False
    if cfg.subset_seed != previous.get("subset_seed") or (
            cfg.subsets and [list(s) for s in parse_subsets(cfg.subsets)] != previous.get("subsets")):
        return False
    if set(layout.planned_shards()) - layout.done_shards():
        return False
    known = {f["sha256"] for ing in previous.get("ingests", []) for f in ing.get("files", [])}
    return all(_file_sha256(path) in known for path in cfg.inputs)


def _build_locked(cfg: BuildConfig, layout: Layout, previous: dict | None) -> dict:
    t0 = time.time()
    layout.clear_scratch()
    if _nothing_to_do(cfg, layout, previous):
        stats = read_json(layout.stats_json)
        log.info(f"{layout.root}: every list already ingested and every shard downloaded; nothing to do")
        stats["build"] = {"finished_at": now(), "total_s": round(time.time() - t0, 3), "downloaded_rows": 0,
                          "images_per_s": None, "nothing_to_do": True}
        stats["builds"] = (stats.get("builds", []) + [stats["build"]])[-100:]
        write_json(layout.stats_json, stats)
        return stats
    timings: dict[str, float] = {}
    opts = DownloadOptions.of(cfg)
    t = time.time()
    with dask_client(cfg.dask_scheduler, cfg.processes_count, os.path.join(layout.work, "dask")) as client:
        timings["cluster_start_s"] = time.time() - t
        # 1. finish what an interrupted run planned
        _download_pending(client, layout, cfg, opts, timings, "resume")
        # 2. new input files form a new ingest
        t = time.time()
        ingest_inputs(client, layout, cfg)
        timings["read_clean_plan_s"] = time.time() - t
        if cfg.retry_failed:
            _plan_retry(layout, cfg)
        _download_pending(client, layout, cfg, opts, timings, "download")
        # 3. post-download stage and the contract files
        t = time.time()
        manifest = assemble_manifest(layout)  # the rows a download could change, no others
        manifest = mark_duplicate_images(client, layout, manifest)
        fmt = cfg.format
        subset_specs = parse_subsets(cfg.subsets) if cfg.subsets else [
            tuple(s) for s in (previous or {}).get("subsets", [])]
        write_manifest(layout, manifest)  # before the subsets: their readers take exclusions from it
        _write_subsets(layout, manifest, subset_specs, cfg.subset_seed, fmt)
        timings["finalize_s"] = time.time() - t
        t = time.time()
    timings["cluster_close_s"] = time.time() - t
    stats = stream_stats(layout.root, fmt)  # over the files just written, a batch of rows at a time
    timings["total_s"] = time.time() - t0
    dl = timings.get("download_s", 0.0)
    stats["build"] = {"finished_at": now(), **{k: round(v, 3) for k, v in timings.items()},
                      "downloaded_rows": timings.get("downloaded_rows", 0),
                      "images_per_s": round(timings.get("downloaded_ok", 0) / dl, 2) if dl else None}
    earlier = read_json(layout.stats_json).get("builds", []) if os.path.isfile(layout.stats_json) else []
    stats["builds"] = (earlier + [stats["build"]])[-100:]  # every run's figures, latest last
    write_json(layout.stats_json, stats)
    config = dataclasses.asdict(cfg)
    write_json(layout.dataset_json, {
        "schema_version": SCHEMA_VERSION,
        "created_at": (previous or {}).get("created_at", now()),
        "updated_at": now(),
        "output_format": fmt,
        "shard_pattern": "shards/{shard:05d}." + ("parquet" if fmt == "arrow" else "tar"),
        "counts": {"rows": stats["rows"], "success": stats["success"], **stats["counts"]},
        "shards": sorted(int(s) for s in manifest.loc[manifest["status"] == SUCCESS, "shard"].dropna().unique()),
        "subsets": [list(s) for s in subset_specs],
        "subset_seed": cfg.subset_seed,
        "config": config,
        "ingests": [{"id": i, **layout.load_inputs(i)} for i in layout.ingest_ids()],
    })
    layout.clear_scratch()
    return stats


def ingest_inputs(client, layout: Layout, cfg: BuildConfig) -> pd.DataFrame | None:
    """Read and clean every new input file (a Dask task each), then mark duplicate URLs, spread hosts,
    assign shards, and save the plan as a new ingest. Files already ingested (same bytes) are skipped.
    Returns the plan, or None when there was nothing new."""
    known = {i["sha256"]: i["path"] for ing in layout.ingest_ids() for i in layout.load_inputs(ing)["files"]}
    workers = max(1, len(client.scheduler_info().get("workers", {})))
    reading = ReadOptions.of(cfg)
    futures = []
    for i, path in enumerate(cfg.inputs):
        # a large file is cleaned in row ranges by several tasks (each reads it; parsing is the cheap part)
        parts = workers if _size(path) > SPLIT_BYTES else 1
        futures.append([client.submit(_read_and_clean, path, reading, part=part, parts=parts,
                                      out=os.path.join(layout.work, "clean", f"{i:05d}-{part:03d}.arrow"),
                                      pure=False, key=f"read-{i}-{part}-{os.path.basename(path)}")
                        for part in range(parts)])
    frames, files = [], []
    for path, futs in zip(cfg.inputs, futures):
        results = [f.result() for f in futs]
        for out, _ in results:
            if isinstance(out, InputError):
                raise out
        sha = results[0][1]
        # the cleaned rows come back through the (shared) dataset folder: faster than the comms for
        # millions of rows
        df = pd.concat([pd.read_feather(out, dtype_backend="pyarrow") for out, _ in results], ignore_index=True)
        if sha in known or sha in {f["sha256"] for f in files}:
            log.info(f"{path}: already ingested (same content as {known.get(sha, 'an earlier argument')}); skipped")
            continue
        if len(df) == 0:
            log.warning(f"warning: {path}: no rows (an empty or header-only list)")
        elif detect_format(path, cfg.input_format) == "txt":
            log.warning(f"warning: {path}: a .txt list has no captions, so its {len(df):,} rows get the empty_caption status "
                        f"(give a csv/tsv/parquet/jsonl list with a caption column)")
        frames.append(df)
        files.append({"path": path, "sha256": sha, "rows": int(len(df))})
    if not frames:
        return None
    plan = pd.concat(frames, ignore_index=True)
    plan = mark_duplicates(plan, _existing_keys(layout))
    plan = assign_shards(plan, cfg.shard_size, _next_shard(layout))
    ingest = (layout.ingest_ids() or [-1])[-1] + 1
    layout.save_ingest(ingest, _compact(plan[PLAN_COLUMNS]), {"kind": "urls", "created_at": now(), "files": files})
    n_shards = plan.loc[plan["shard"] >= 0, "shard"].nunique()
    log.info(f"ingest {ingest}: {len(plan):,} rows from {len(files)} file(s); "
             f"{int((plan['status'] == PENDING).sum()):,} to download in {n_shards} shard(s)")
    return plan


def _compact(plan: pd.DataFrame) -> pd.DataFrame:
    """Few distinct values -> categorical (a Parquet dictionary): small and fast to write and read."""
    plan = plan.copy(deep=False)
    for col in ("status", "error", "source"):
        if not isinstance(plan[col].dtype, pd.CategoricalDtype):
            plan[col] = pd.Categorical(plan[col].to_numpy(dtype=object))
    return plan


def _size(path: str) -> int:
    import fsspec

    try:
        fs, p = fsspec.core.url_to_fs(path)
        return int(fs.size(p) or 0)
    except (OSError, ValueError):
        return 0


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """What a read-and-clean task needs of the build's options."""
    input_format: str | None
    url_col: str
    caption_col: str
    max_caption_length: int
    column_names: list | None

    @classmethod
    def of(cls, cfg: BuildConfig) -> "ReadOptions":
        return cls(input_format=cfg.input_format, url_col=cfg.url_col, caption_col=cfg.caption_col,
                   max_caption_length=cfg.max_caption_length, column_names=cfg.column_names or None)


def _read_and_clean(path: str, opts: ReadOptions, *, part: int, parts: int, out: str):
    """Dask task: read one URL list, run the per-partition stages on rows [part/parts, (part+1)/parts) and
    write them to `out` (Arrow IPC). Returns (out, sha256 of the file). Bad input comes back as a value (not
    raised), so that the worker does not log it as a failed computation."""
    try:
        df, sha = read_source(path, opts.input_format, opts.url_col, opts.caption_col, opts.column_names)
    except InputError as err:
        return err, None
    if parts > 1:
        n = len(df)
        df = df.iloc[n * part // parts: n * (part + 1) // parts].reset_index(drop=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    clean_partition(df, opts.max_caption_length).reset_index(drop=True).to_feather(
        out, compression="uncompressed")
    return out, sha


def _existing_keys(layout: Layout) -> set:
    keys: set = set()
    for ingest in layout.ingest_ids():
        keys.update(layout.load_plan(ingest, ["key"])["key"].tolist())
    return keys


def _next_shard(layout: Layout) -> int:
    return max(layout.planned_shards(upgrade=True), default=-1) + 1


def _pending_shards(layout: Layout) -> dict[int, tuple[str, int]]:
    """shard -> (input file, rows) for every planned shard with no result yet."""
    done = layout.done_shards()
    return {shard: v for shard, v in sorted(layout.planned_shards(upgrade=True).items()) if shard not in done}


def _download_pending(client, layout: Layout, cfg: BuildConfig, opts: DownloadOptions, timings: dict,
                      what: str) -> None:
    todo = _pending_shards(layout)
    if not todo:
        return
    n_rows = sum(rows for _, rows in todo.values())
    if what == "resume":
        log.info(f"resuming: {len(todo)} planned shard(s) ({n_rows:,} rows) have no result yet")
    t = time.time()
    if opts.host_rate:  # each worker process keeps its share of the build's per-host cap
        workers = max(1, len(client.scheduler_info().get("workers", {})))
        opts = dataclasses.replace(opts, host_rate=opts.host_rate / workers)
    # a task gets the shard's input file, never its rows: the scheduler's traffic does not grow with rows
    futures = {client.submit(download_partition, path, shard, layout.root, opts, pure=False, retries=1,
                             key=f"download-{shard:05d}-{time.time_ns()}"): shard for shard, (path, _) in todo.items()}
    failed, ok = [], 0
    rows_of = {shard: rows for shard, (_, rows) in todo.items()}
    for fut in _finished_by_rows(futures, rows_of, layout.work, cfg.progress):
        shard = futures[fut]
        try:
            res = fut.result()
        except Exception as err:  # pylint: disable=broad-except
            failed.append(f"{shard:05d} ({type(err).__name__}: {err})")
            continue
        write_parquet(layout.result_path(shard), res)
        ok += int((res["status"] == SUCCESS).sum())
    timings["download_s"] = timings.get("download_s", 0.0) + time.time() - t
    timings["downloaded_rows"] = timings.get("downloaded_rows", 0) + n_rows
    timings["downloaded_ok"] = timings.get("downloaded_ok", 0) + ok
    if failed:
        raise PsdclipError(f"{len(failed)} shard(s) failed as a whole: {'; '.join(failed[:3])}; "
                           f"rerun the same command to retry them")


def _plan_retry(layout: Layout, cfg: BuildConfig) -> None:
    manifest = assemble_manifest(layout)  # transient statuses come from downloads only
    retry = manifest[manifest["status"].isin(TRANSIENT)]
    if retry.empty:
        log.info("--retry-failed: no row has a transient status; nothing to retry")
        return
    plan = retry[["key", "url", "caption", "source", "source_row"]].copy()
    plan["status"], plan["error"] = PENDING, ""
    plan["host"] = pd.arrays.ArrowStringArray(hosts(pa.array(plan["url"].array), np.ones(len(plan), bool)))
    plan = assign_shards(plan, cfg.shard_size, _next_shard(layout))
    ingest = layout.ingest_ids()[-1] + 1
    layout.save_ingest(ingest, plan[PLAN_COLUMNS], {"kind": "retry", "created_at": now(), "files": []})
    log.info(f"--retry-failed: ingest {ingest} downloads {len(plan):,} row(s) again "
             f"({', '.join(f'{k} {v}' for k, v in retry['status'].value_counts().items())})")


def mark_duplicate_images(client, layout: Layout, manifest: pd.DataFrame) -> pd.DataFrame:
    """Post-download Dask stage: among successful rows with the same sha256, the first in input order
    (the manifest's row order: ingest, then file, then row) stays 'success'; the rest become
    'duplicate_image'. Map: per chunk, the first rank of each hash (on the workers); reduce: the minimum."""
    mask = ((manifest["status"] == SUCCESS) & (manifest["sha256"] != "")).to_numpy()
    if not mask.any():
        return manifest
    ranks = pd.DataFrame({"sha256": manifest["sha256"].to_numpy()[mask], "rank": np.flatnonzero(mask)})
    chunks = [ranks.iloc[i: i + 250_000] for i in range(0, len(ranks), 250_000)]
    firsts = client.gather(client.map(_first_rank_per_hash, chunks, pure=False))
    first = pd.concat(firsts).groupby(level=0).min()
    is_dup = ranks["rank"].to_numpy() != first.reindex(ranks["sha256"]).to_numpy()
    if is_dup.any():
        idx = manifest.index[ranks["rank"].to_numpy()[is_dup]]
        manifest = manifest.copy()
        manifest.loc[idx, "status"] = DUPLICATE_IMAGE
        manifest.loc[idx, "error"] = "same image bytes (sha256) as an earlier sample"
    return manifest


def _first_rank_per_hash(chunk: pd.DataFrame) -> pd.Series:
    return chunk.groupby("sha256")["rank"].min()


def _write_subsets(layout: Layout, manifest: pd.DataFrame, specs, seed: int, fmt: str) -> None:
    if not specs:
        return
    success = manifest.loc[manifest["status"] == SUCCESS, ["key", "shard"]].copy()
    success["shard"] = [layout.shard_name(int(s), fmt) for s in success["shard"]]
    docs = build_subsets(success, specs, seed)
    for name, doc in docs.items():
        doc["shards"] = [f"shards/{s}" for s in doc["shards"]]
        if doc["boundary"]:
            doc["boundary"]["shard"] = f"shards/{doc['boundary']['shard']}"
        if doc["truncated"]:
            log.info(f"subset {name}: asked for {doc['requested']:,} samples, the dataset has {doc['count']:,}")
        write_json(os.path.join(layout.subsets, f"{name}.json"), doc)
