"""psdclip data build: the orchestration of the pipeline's stages on a Dask cluster.

    read + clean (Dask tasks over parts of the input files) -> duplicate URLs and keys (a task per URL-key
    bucket) -> host spreading and shards (a task per bucket, then per group of shards; ingest.py) -> plan saved
    atomically as shard input files -> download (Dask task per partition, img2dataset) -> result per shard
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
import tempfile
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from ..core import logs, storage
from ..core.errors import DiskFullError, InputError, PsdclipError
from ..core.io import now, read_json, write_json, write_parquet
from ..core.locks import folder_lock
from .buckets import worker_count
from .config import BuildConfig
from .dataset import Layout
from .download import DiskFull, DownloadOptions, download_partition, rows_in_flight
from .finalize import finalize_manifest, write_subsets
from .folders import folder_list
from .format import SCHEMA_VERSION, dataset_id
from .ingest import ingest_inputs
from .parts import file_sha256
from .reader import manifest_files
from .retry import plan_retry
from .stall import StallWatch
from .stats import stream_stats
from .status import SUCCESS
from .subsets import parse_subsets

log = logs.get(__name__, "[psdclip data build] ")


QUIET_WORKERS = {"distributed.worker.profile.enabled": False, "distributed.admin.system-monitor.gil.enabled": False}


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
    import dask

    os.makedirs(local_directory, exist_ok=True)
    # Our private cluster runs with the worker's statistical profiler, GIL monitor and GC diagnosis off: nobody
    # looks at them here, and a worker once deadlocked starting a download's thread pool while its event loop sat
    # in the profiler's GC callback (pipeline/stall.py restarts a worker that hangs all the same). The nannies
    # hand this config to every worker process they start, restarted ones too.
    with dask.config.set(QUIET_WORKERS):
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                               local_directory=local_directory, silence_logs=logging.ERROR)
    client = Client(cluster)
    from .quiet_worker import NoGCDiagnosis  # lazy: distributed's worker

    client.register_plugin(NoGCDiagnosis())
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


def _in_flight_counter(client, layout: Layout):
    """A function giving the rows the download tasks in flight have written so far: their sample writers note it in
    WORK/rows-done, under the dataset's _work/ (read here), or, for a dataset on an object store, in each worker's
    temporary folder (read there by one call to every worker, at most every 2 s)."""
    if not storage.is_remote(layout.root):
        def local() -> int:
            total = 0
            for path in glob.glob(os.path.join(layout.work, "*", "rows-done")):
                with contextlib.suppress(OSError, ValueError):
                    with open(path, encoding="utf-8") as f:
                        total += int(f.read() or 0)
            return total

        return local
    import threading

    # asked in a daemon thread of its own: a worker that hangs must hang neither the client's poll (and its stall
    # watch) nor the process's exit after the build stops
    last = {"asked": 0.0, "rows": 0, "asking": None}

    def ask():
        with contextlib.suppress(Exception):  # a worker gone meanwhile: the next poll asks again
            last["rows"] = sum(client.run(rows_in_flight, layout.root).values())

    def remote() -> int:
        asking = last["asking"]
        if (asking is None or not asking.is_alive()) and time.monotonic() - last["asked"] >= 2.0:
            last["asked"] = time.monotonic()
            last["asking"] = threading.Thread(target=ask, name="psdclip-rows-in-flight", daemon=True)
            last["asking"].start()
        return last["rows"]

    return remote


def _finished_by_rows(futures: dict, rows: dict, in_flight, enabled: bool, watch=None):
    """Yield the futures as they finish while a progress bar counts rows: those of finished shards plus what
    the shards in flight have written so far (in_flight(): see _in_flight_counter), so the bar moves on a job of a
    few large shards too. watch (a stall.StallWatch) is shown the same count at every poll."""
    from dask.distributed import wait as dask_wait

    bar = None
    if enabled:
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
            seen = finished + in_flight()
            if watch is not None and pending:
                watch.check(seen, pending)
            if bar is not None:
                bar.n = max(bar.n, min(bar.total, seen))
                bar.refresh()
        if bar is not None:
            bar.n = bar.total
            bar.refresh()
    finally:
        if bar is not None:
            bar.close()


def build(cfg: BuildConfig) -> dict:
    """Run (or resume, or extend) a build. Returns the stats dict.

    If the output folder did not exist and the build stops on bad input before anything was planned,
    the folder is removed again; an existing dataset is never left changed by a failed read."""
    fresh = not storage.exists(cfg.out)
    try:
        return _build(cfg)
    except InputError:
        layout = Layout(cfg.out)
        if fresh and storage.isdir(layout.root) and not layout.ingest_ids():
            storage.rmtree(layout.root)
        raise


# options an existing dataset was built with that an append must keep (mixed shards otherwise)
FIXED_OPTIONS = ("image_size", "resize_mode", "encode_format", "encode_quality", "save_additional_columns")


def _check_out(cfg: BuildConfig, layout: Layout, previous: dict | None) -> BuildConfig:
    """Refuse an --out that is a file, or a non-empty folder that is not a psdclip dataset (its files would be
    overwritten), and an append whose image options differ from the dataset's. An image option left at its default
    takes the dataset's own value (--retry-failed or a new list on a 64 px dataset needs no --image-size 64)."""
    if storage.isfile(cfg.out):
        raise InputError(f"--out {cfg.out}: is a file, not a dataset directory")
    if previous is None and not storage.isdir(layout.state) and storage.listdir(cfg.out):
        raise InputError(f"--out {cfg.out}: a non-empty folder that is not a psdclip dataset; choose a new or empty "
                         f"folder")
    if previous and (previous.get("config") or {}).get("imported_from"):
        raise InputError(f"--out {cfg.out}: a dataset imported from img2dataset output "
                         f"({previous['config']['imported_from']}); build new lists into a new dataset and train on "
                         f"both (--data A::B)")
    if previous and previous.get("output_format") != cfg.format:
        raise InputError(f"{cfg.out}: the dataset holds {previous.get('output_format')} shards; "
                         f"cannot append with --format {cfg.format}")
    before = (previous or {}).get("config") or {}
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(BuildConfig)}
    own = {n: before[n] for n in FIXED_OPTIONS if n in before and getattr(cfg, n) == defaults[n] != before[n]}
    if own:
        flags = ", ".join(f"--{n.replace('_', '-')} {v}" for n, v in own.items())
        log.info(f"{cfg.out}: appending with the dataset's own {flags}")
        cfg = dataclasses.replace(cfg, **own)
    for name in FIXED_OPTIONS:
        if name in before and before[name] != getattr(cfg, name):
            raise InputError(f"{cfg.out}: the dataset was built with --{name.replace('_', '-')} {before[name]}; "
                             f"cannot append with {getattr(cfg, name)} (use a new --out)")
    return cfg


@contextlib.contextmanager
def _build_lock(layout: Layout):
    """One build at a time per dataset: an advisory lock the OS drops when the process ends, even by kill -9."""
    if storage.is_remote(layout.root):
        with _object_lock(layout):
            yield
        return
    with folder_lock(os.path.join(layout.state, "build.lock"),
                     f"{layout.root}: another `psdclip data build` ({{holder}}) is writing this dataset; wait for it "
                     f"to finish"):
        yield


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    return True


@contextlib.contextmanager
def _object_lock(layout: Layout):
    """The build lock of a dataset on an object store: an object naming its holder (pid, host), removed at the end.
    An object store cannot drop it when the holder dies: a lock left by a dead process of this host is taken over;
    one from another host is reported with how to remove it."""
    import socket

    path = storage.join(layout.state, "build.lock")
    host = socket.gethostname()
    if storage.exists(path):
        try:
            holder = read_json(path)
        except InputError:
            holder = {}
        if holder.get("host") == host and not _pid_alive(int(holder.get("pid", -1))):
            log.info(f"{path}: left by an earlier build (pid {holder.get('pid')}, no longer running); taken over")
        else:
            raise InputError(f"{layout.root}: another `psdclip data build` (pid {holder.get('pid')} on "
                             f"{holder.get('host')}, since {holder.get('since')}) is writing this dataset; wait for "
                             f"it to finish (if it was killed, remove {path})")
    me = {"pid": os.getpid(), "host": host, "since": now()}
    write_json(path, me)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            if read_json(path) == me:  # still ours
                storage.remove(path)


def _build(cfg: BuildConfig) -> dict:
    layout = Layout(cfg.out)
    try:
        storage.check_writable(layout.root)
    except Exception as err:  # pylint: disable=broad-except  (no bucket, no credentials, access denied, no network)
        raise InputError(f"--out {cfg.out}: cannot write there ({type(err).__name__}: "
                         f"{(str(err).splitlines() or [''])[0][:200]})") from None
    previous = read_json(layout.dataset_json) if storage.isfile(layout.dataset_json) else None
    cfg = _check_out(cfg, layout, previous)
    if cfg.dask_scheduler and cfg.processes_count != 2:  # (2: the default) a recipe's LocalCluster size, said unused
        log.warning(f"--processes-count {cfg.processes_count} sizes a LocalCluster; with --dask-scheduler the "
                    f"cluster's own workers run the build, so it is not used")
    folders = [p for p in cfg.inputs if "://" not in p and os.path.isdir(p)]
    if folders and not cfg.local_root:
        raise InputError(f"{folders[0]}: a folder; give --local-root FOLDER (or a folder above it) to read its "
                         f"images")
    if folders and storage.is_remote(layout.root):
        raise InputError(f"{folders[0]}: local images go into a local dataset folder, not {cfg.out}")
    if folders:  # each folder walked into a list of its images (folders.py), then read like any list

        os.makedirs(layout.state, exist_ok=True)
        cfg = dataclasses.replace(cfg, inputs=[folder_list(p, cfg.local_root, layout.state) if p in folders else p
                                               for p in cfg.inputs])
    if cfg.local_root and not os.path.isdir(cfg.local_root):
        raise InputError(f"--local-root {cfg.local_root}: no such folder")
    if not cfg.inputs and not cfg.retry_failed and not layout.ingest_ids():
        raise InputError("no URL list given (psdclip data build URL_LIST... --out DATASET)")
    layout.create()
    with _build_lock(layout):
        return _build_locked(cfg, layout, previous)


def already_built(cfg: BuildConfig) -> bool:
    """True when a build of cfg would do nothing (every list ingested, every shard downloaded, the same subsets):
    a recipe or sweep run again need not serve its source (another process of the same sweep may be serving it)
    nor take the build lock."""
    layout = Layout(cfg.out)
    if storage.is_remote(layout.root) or not storage.isfile(layout.dataset_json):
        return False
    return _nothing_to_do(cfg, layout, read_json(layout.dataset_json))


def _nothing_to_do(cfg: BuildConfig, layout: Layout, previous: dict | None) -> bool:
    """A rerun of a finished build on lists it already holds (a sweep or recipe run again): nothing to read, plan,
    download or rewrite, so no cluster is started."""
    if not previous or cfg.retry_failed or previous.get("schema_version") != SCHEMA_VERSION:
        return False
    if not storage.isdir(layout.manifest) or not storage.isfile(layout.stats_json):
        return False
    if cfg.subset_seed != previous.get("subset_seed") or (
            cfg.subsets and [list(s) for s in parse_subsets(cfg.subsets)] != previous.get("subsets")):
        return False
    if set(layout.planned_shards()) - layout.done_shards():
        return False
    known = {f["sha256"] for ing in previous.get("ingests", []) for f in ing.get("files", [])}
    return all(file_sha256(path) in known for path in cfg.inputs) and _manifest_readable(layout)


def _manifest_readable(layout: Layout) -> bool:
    """Every manifest file's Parquet footer reads: a damaged one (which readers report, naming this command) makes
    the rerun write the manifest again from the build's own state."""
    for path in manifest_files(layout.root):
        fs, p = storage.arrow_filesystem(path)
        try:
            pq.ParquetFile(p, filesystem=fs).metadata  # noqa: B018  (reads and checks the footer)
        except (OSError, pa.ArrowException) as err:
            log.warning(f"{path}: damaged ({str(err).splitlines()[0][:120]}); writing the manifest again")
            return False
    return True


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
    # a local cluster's scratch space: in the dataset folder, or a temporary folder for a dataset on an object store
    scratch = contextlib.nullcontext(os.path.join(layout.work, "dask")) if not storage.is_remote(layout.root) else \
        tempfile.TemporaryDirectory(prefix="psdclip-dask-")
    with scratch as local_dir, dask_client(cfg.dask_scheduler, cfg.processes_count, local_dir) as client:
        timings["cluster_start_s"] = time.time() - t
        # 1. finish what an interrupted run planned
        _download_pending(client, layout, cfg, opts, timings, "resume")
        # 2. new input files form a new ingest
        t = time.time()
        ingest_inputs(client, layout, cfg)
        timings["read_clean_plan_s"] = time.time() - t
        _download_pending(client, layout, cfg, opts, timings, "download")
        # 3. post-download stage and the contract files (Dask tasks over groups of shards; finalize.py)
        t = time.time()
        counts = finalize_manifest(client, layout)
        if cfg.retry_failed and _plan_retry(client, layout, cfg):  # transient failures, from the manifest just written
            timings["finalize_s"] = time.time() - t
            _download_pending(client, layout, cfg, opts, timings, "download")
            t = time.time()
            counts = finalize_manifest(client, layout)
        fmt = cfg.format
        the_id = dataset_id(previous) if previous else uuid.uuid4().hex[:16]
        subset_specs = parse_subsets(cfg.subsets) if cfg.subsets else [
            tuple(s) for s in (previous or {}).get("subsets", [])]
        write_subsets(layout, counts, subset_specs, cfg.subset_seed, fmt, the_id)  # after manifest/: readers use it
        timings["finalize_s"] = timings.get("finalize_s", 0.0) + time.time() - t
        t = time.time()
    timings["cluster_close_s"] = time.time() - t
    stats = stream_stats(layout.root, fmt)  # over the files just written, a batch of rows at a time
    timings["total_s"] = time.time() - t0
    dl = timings.get("download_s", 0.0)
    stats["build"] = {"finished_at": now(), **{k: round(v, 3) for k, v in timings.items()},
                      "downloaded_rows": timings.get("downloaded_rows", 0),
                      "images_per_s": round(timings.get("downloaded_ok", 0) / dl, 2) if dl else None}
    earlier = read_json(layout.stats_json).get("builds", []) if storage.isfile(layout.stats_json) else []
    stats["builds"] = (earlier + [stats["build"]])[-100:]  # every run's figures, latest last
    write_json(layout.stats_json, stats)
    config = dataclasses.asdict(cfg)
    write_json(layout.dataset_json, {
        "schema_version": SCHEMA_VERSION,
        "id": the_id,
        "created_at": (previous or {}).get("created_at", now()),
        "updated_at": now(),
        "output_format": fmt,
        "counts": {"rows": stats["rows"], "success": stats["success"], **stats["counts"]},
        "shards": sorted(s for s, n in counts.items() if n),
        "subsets": [list(s) for s in subset_specs],
        "subset_seed": cfg.subset_seed,
        "config": config,
        "ingests": [{"id": i, **layout.load_inputs(i)} for i in layout.ingest_ids()],
    })
    layout.clear_scratch()
    return stats


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
        workers = worker_count(client)
        opts = dataclasses.replace(opts, host_rate=opts.host_rate / workers)
    # a task gets the shard's input file, never its rows: the scheduler's traffic does not grow with rows
    futures = {client.submit(download_partition, path, shard, layout.root, opts, pure=False, retries=1,
                             key=f"download-{shard:05d}-{time.time_ns()}"): shard for shard, (path, _) in todo.items()}
    failed, ok = [], 0
    rows_of = {shard: rows for shard, (_, rows) in todo.items()}
    watch = StallWatch(client, futures, cfg.stall_timeout, None if storage.is_remote(layout.root) else layout.work)
    for fut in _finished_by_rows(futures, rows_of, _in_flight_counter(client, layout), cfg.progress, watch):
        shard = futures[fut]
        try:
            res = fut.result()
        except Exception as err:  # pylint: disable=broad-except
            failed.append(f"{shard:05d} ({type(err).__name__}: {err})")
            continue
        if isinstance(res, DiskFull):  # every later shard would fail alike: stop them, say it in one line
            client.cancel(list(futures))
            raise DiskFullError(res.message)
        write_parquet(layout.result_path(shard), res)
        ok += int((res["status"] == SUCCESS).sum())
    timings["download_s"] = timings.get("download_s", 0.0) + time.time() - t
    timings["downloaded_rows"] = timings.get("downloaded_rows", 0) + n_rows
    timings["downloaded_ok"] = timings.get("downloaded_ok", 0) + ok
    if failed:
        raise PsdclipError(f"{len(failed)} shard(s) failed as a whole: {'; '.join(failed[:3])}; "
                           f"rerun the same command to retry them")


def _plan_retry(client, layout: Layout, cfg: BuildConfig) -> bool:
    """--retry-failed: a new ingest of the rows whose status is transient (ingest.plan_retry: Dask tasks over the
    manifest's files). False when there is none."""
    r = plan_retry(client, layout, cfg.shard_size)
    if r is None:
        log.info("--retry-failed: no row has a transient status; nothing to retry")
        return False
    log.info(f"--retry-failed: ingest {r['ingest']} downloads {r['pending']:,} row(s) again "
             f"({', '.join(f'{k} {v}' for k, v in sorted(r['statuses'].items()))})")
    return True
