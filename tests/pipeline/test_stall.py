"""A download task that stops making progress (its worker process hung) does not hang the build: its worker is
restarted and the shard run again, once; stuck a second time, the build stops with one line and the same command
resumes. The hang is a real one: the test freezes the build's real Dask worker process with SIGSTOP."""
import glob
import os
import signal
import subprocess
import time

import pandas as pd
import psutil
from helpers.cli import BIN
from helpers.datasets import tar_members

STALL_S = 20  # long enough for a restarted worker to start and import img2dataset on a busy machine


def _start(urls, ds):
    return subprocess.Popen([os.path.join(BIN, "psdclip"), "data", "build", str(urls), "--out", str(ds),
                             "--image-size", "32", "--shard-size", "100", "--thread-count", "2",
                             "--processes-count", "1", "--stall-timeout", str(STALL_S), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _worker(proc) -> psutil.Process | None:
    """The build's Dask worker process (a spawned child of the build; its nanny lives in the build's process)."""
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "spawn_main" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def _freeze_worker_mid_shard(proc, ds, not_pid=None, timeout=120) -> int:
    """Wait until a worker other than not_pid is writing a shard (its rows-done file has rows), SIGSTOP it and
    return its pid."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        worker = _worker(proc)
        busy = [p for p in glob.glob(str(ds / "_work" / "*" / "rows-done")) if open(p).read().strip() not in ("", "0")]
        if worker is not None and worker.pid != not_pid and busy:
            worker.send_signal(signal.SIGSTOP)
            return worker.pid
        time.sleep(0.05)
    raise AssertionError(f"no worker was seen writing a shard (build exit {proc.poll()})")


def _check_complete(ds):
    m = pd.read_parquet(ds / "manifest")
    assert len(m) == 300 and m["key"].is_unique and (m["status"] == "success").all()
    assert sorted(tar_members(ds)) == sorted(m["key"])
    assert not glob.glob(str(ds / "_work" / "*" / "rows-done"))


def test_a_hung_worker_is_restarted_and_its_shard_run_again(synth_urls, server, tmp_path):
    server.delay_s = 0.03  # ~1.5 s a shard of 100 rows on 2 threads: time to catch the worker mid-shard
    ds = tmp_path / "ds"
    proc = _start(synth_urls, ds)
    try:
        frozen = _freeze_worker_mid_shard(proc, ds)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    assert f"wrote no row for {STALL_S} s; restarting worker process {frozen}" in err, err[-3000:]
    assert not psutil.pid_exists(frozen) or psutil.Process(frozen).status() == psutil.STATUS_ZOMBIE
    _check_complete(ds)


def test_a_shard_stuck_twice_stops_the_build_in_one_line_and_a_rerun_finishes(synth_urls, server, tmp_path):
    server.delay_s = 0.03
    ds = tmp_path / "ds"
    proc = _start(synth_urls, ds)
    frozen = []
    try:
        frozen.append(_freeze_worker_mid_shard(proc, ds))
        # the restarted worker takes a shard again (the stuck one, or one after it); freeze it each time until the
        # build gives up on a shard it already restarted
        while proc.poll() is None and len(frozen) < 5:
            try:
                frozen.append(_freeze_worker_mid_shard(proc, ds, not_pid=frozen[-1], timeout=60))
            except AssertionError:
                break
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in frozen:  # nothing left stopped behind the test
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode != 0
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("psdclip:") or "Traceback" in ln]
    assert "Traceback" not in err, err[-3000:]
    assert lines and "download stalled: shard(s) 0000" in lines[-1] and "again after its worker process was " \
        "restarted" in lines[-1] and "rerun the same command" in lines[-1], err[-3000:]
    assert err.count("restarting worker process") == len(frozen) - 1
    # the same command, with no worker frozen, resumes and finishes: every row once
    server.delay_s = 0.0
    r = subprocess.run([os.path.join(BIN, "psdclip"), "data", "build", str(synth_urls), "--out", str(ds),
                        "--image-size", "32", "--shard-size", "100", "--thread-count", "2", "--processes-count", "1",
                        "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _check_complete(ds)


def _worker_diagnostics():
    import dask
    import distributed.gc

    return distributed.gc._gc_diagnosis.enabled, dask.config.get("distributed.worker.profile.enabled")


def test_our_local_cluster_runs_without_profiler_and_gc_diagnosis(tmp_path):
    """The hung worker sat in distributed's GC-diagnosis callback, called from its profiler: our own LocalCluster
    turns both off in every worker (a plain LocalCluster has both on)."""
    from psdclip.pipeline.build import dask_client

    with dask_client(None, 1, str(tmp_path / "dask")) as client:
        assert list(client.run(_worker_diagnostics).values()) == [(False, False)]
