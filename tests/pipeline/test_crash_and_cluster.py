"""kill -9 at any point and rerun; a separately started `dask scheduler` + `dask worker`; the CLI."""
import json
import os
import signal
import socket
import subprocess
import time

import pandas as pd
import pytest
from helpers.cli import BIN, cli
from helpers.datasets import cfg, tar_members

from psdclip.pipeline.build import build


def run_cli(*args):
    return cli(*args, check=False)


@pytest.mark.parametrize("kill_when", ["first-shard", "early"])
def test_kill_9_and_rerun_loses_and_duplicates_nothing(synth_urls, server, tmp_path, kill_when):
    server.delay_s = 0.05
    ds = tmp_path / "ds"
    proc = subprocess.Popen([os.path.join(BIN, "psdclip"), "data", "build", str(synth_urls), "--out", str(ds),
                             "--image-size", "32", "--shard-size", "40", "--thread-count", "2", "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    results = ds / "_state" / "results"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if kill_when == "early" and time.time() > deadline - 118:
            break
        if kill_when == "first-shard" and results.is_dir() and any(p.suffix == ".parquet" for p in results.iterdir()):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the build finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    done_before = sorted(p.name for p in results.iterdir() if p.suffix == ".parquet") if results.is_dir() else []
    if kill_when == "first-shard":
        assert done_before
    hits_before = dict(server.hits)
    ingests = ds / "_state" / "ingests"
    if ingests.is_dir() and any(p.name.isdigit() for p in ingests.iterdir()):  # planned, then cut off
        r = cli("data", "stats", ds, check=False)
        assert r.returncode == 2 and "incomplete build" in r.stderr and "rerun the same" in r.stderr, r.stderr
    server.delay_s = 0.0
    build(cfg([synth_urls], ds, shard_size=40))
    m = pd.read_parquet(ds / "manifest")
    assert len(m) == 300 and m["key"].is_unique and (m["status"] == "success").all()
    assert set(tar_members(ds)) == set(m["key"])
    assert not [p for p in ds.rglob("*") if ".tmp-" in p.name]
    # the shards finished before the kill were not downloaded again
    for name in done_before:
        shard = int(name.split(".")[0])
        for url in m.loc[m["shard"] == shard, "url"]:
            path = "/img/" + url.split("/img/", 1)[1]
            assert server.hits[path] == hits_before[path] == 1


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_separate_dask_scheduler_and_workers(synth_urls, tmp_path):
    port = free_port()
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    sched = subprocess.Popen([os.path.join(BIN, "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                              "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                             start_new_session=True)
    worker = subprocess.Popen([os.path.join(BIN, "dask"), "worker", f"tcp://127.0.0.1:{port}", "--nworkers", "2",
                               "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1",
                               "--local-directory", str(tmp_path / "worker-space")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        from dask.distributed import Client

        with Client(f"tcp://127.0.0.1:{port}", timeout="60s") as client:
            client.wait_for_workers(2, timeout=60)
        ds = tmp_path / "ds"
        stats = build(cfg([synth_urls], ds, dask_scheduler=f"tcp://127.0.0.1:{port}"))
        assert stats["success"] == 300 and stats["shards"] == 4
        assert set(tar_members(ds)) == set(pd.read_parquet(ds / "manifest")["key"])
    finally:
        for p in (worker, sched):
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=30)


def test_cli_build_stats_and_one_line_errors(synth_urls, tmp_path):
    ds = tmp_path / "ds"
    r = run_cli("data", "build", synth_urls, "--out", ds, "--image-size", "24", "--shard-size", "100",
                "--subsets", "0.1,1.0", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "success" in r.stdout and "300" in r.stdout
    s = json.loads(run_cli("data", "stats", ds, "--json").stdout)
    assert s["counts"] == {"success": 300} and s["shards"] == 3
    assert "success" in run_cli("data", "stats", ds).stdout
    bad = tmp_path / "bad.csv"
    bad.write_text("link,text\nhttp://a.test/x.jpg,y\n")
    # a folder of the user's that is not a dataset, a file, a damaged dataset
    theirs = tmp_path / "theirs"
    (theirs / "shards").mkdir(parents=True)
    (theirs / "shards" / "00000.tar").write_bytes(b"the user's own file")
    (tmp_path / "afile").write_text("x")
    broken = tmp_path / "broken"
    (broken / "_state").mkdir(parents=True)
    (broken / "dataset.json").write_text("{")
    (broken / "manifest.parquet").write_bytes(b"not parquet at all")
    cases = [
        (["data", "build", synth_urls, "--out", theirs], "a non-empty folder that is not a psdclip dataset"),
        (["data", "build", synth_urls, "--out", tmp_path / "afile"], "is a file, not a dataset directory"),
        (["data", "build", synth_urls, "--out", ds, "--image-size", "32"], "built with --image-size 24"),
        (["data", "stats", broken], "manifest.parquet: damaged"),
        (["data", "build", synth_urls, "--out", broken], "dataset.json: damaged"),
        (["data", "build", bad, "--out", tmp_path / "new"], "bad.csv: no column 'url'"),
        (["data", "build", tmp_path / "nope.csv", "--out", tmp_path / "new"], "nope.csv: no such file"),
        (["data", "build", synth_urls], "--out"),
        (["data", "build", synth_urls, "--out", ds, "--format", "arrow"], "cannot append with --format arrow"),
        (["data", "build", synth_urls, "--out", ds, "--subsets", "0.1,zero"], "--subsets 'zero'"),
        (["data", "stats", tmp_path], "not a psdclip dataset"),
        (["data", "build", synth_urls, "--out", ds, "--shard-timeout", "0"], "--shard-timeout must be > 0"),
        (["data", "build", synth_urls, "--out", ds, "--host-rate", "-1"], "--host-rate must be >= 0"),
        (["data", "build", synth_urls, "--out", ds, "--config", tmp_path / "missing.yaml"], "no such config file"),
    ]
    for args, expect in cases:
        r = run_cli(*args)
        assert r.returncode != 0, args
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and expect in lines[0], (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "new").exists()  # a failed fresh build leaves nothing behind
    assert pd.read_parquet(ds / "manifest")["status"].eq("success").sum() == 300  # nothing lost
    assert (theirs / "shards" / "00000.tar").read_bytes() == b"the user's own file"
    assert json.loads((ds / "dataset.json").read_text())["config"]["image_size"] == 24
    # --retry-failed (or a list appended) without --image-size takes the dataset's own (it said "cannot append
    # with 256")
    r = run_cli("data", "build", "--out", ds, "--retry-failed", "--no-progress")
    assert r.returncode == 0 and "the dataset's own --image-size 24" in r.stderr, r.stderr[-2000:]
    assert json.loads((ds / "dataset.json").read_text())["config"]["image_size"] == 24


def test_two_builds_into_one_dataset_the_second_says_who_holds_it(synth_urls, tmp_path):
    ds = tmp_path / "ds"
    args = ["data", "build", synth_urls, "--out", ds, "--image-size", "24", "--shard-size", "100", "--no-progress"]
    first = subprocess.Popen([os.path.join(BIN, "psdclip"), *map(str, args)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    lock = ds / "_state" / "build.lock"
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None and not (lock.exists() and lock.read_text()):
        time.sleep(0.01)
    assert first.poll() is None, "the first build ended before the second could start"
    second = run_cli(*args)
    assert second.returncode == 2 and f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    assert len([ln for ln in second.stderr.splitlines() if ln.strip()]) == 1, second.stderr
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    assert pd.read_parquet(ds / "manifest")["status"].eq("success").sum() == 300
    assert run_cli(*args).returncode == 0  # the lock is free again once the first has ended


def test_data_serve_leaves_the_url_list_alone_and_refuses_a_busy_port(tmp_path):
    src = tmp_path / "s"
    assert run_cli("data", "synth", "--out", src, "--n", 5, "--heldout", 0, "--image-size", 32).returncode == 0
    before = (src / "urls.csv").read_bytes()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run_cli("data", "serve", src, "--port", port)
        assert r.returncode == 2 and f"--port {port}: cannot listen" in r.stderr and "Traceback" not in r.stderr
    proc = subprocess.Popen([os.path.join(BIN, "psdclip"), "data", "serve", str(src), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("URL list for this address:"), line
        listed = line.split(": ", 1)[1].strip()
        assert os.path.basename(listed).startswith("urls-127.0.0.1-") and os.path.isfile(listed)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert (src / "urls.csv").read_bytes() == before


def test_cli_yaml_config_and_override(tmp_path):
    (tmp_path / "synth.yaml").write_text("n: 20\nseed: 4\nheldout: 0\nimage-size: 32\n")
    r = run_cli("data", "synth", "--config", tmp_path / "synth.yaml", "--out", tmp_path / "s", "--n", "12")
    assert r.returncode == 0, r.stderr
    assert len(pd.read_csv(tmp_path / "s" / "urls.csv")) == 12
    (tmp_path / "bad.yaml").write_text("n: twelve\n")
    r = run_cli("data", "synth", "--config", tmp_path / "bad.yaml", "--out", tmp_path / "t")
    assert r.returncode == 2 and "expected int" in r.stderr
    for cmd in (["--help"], ["data", "--help"], ["data", "build", "--help"], ["data", "synth", "--help"],
                ["data", "serve", "--help"], ["data", "stats", "--help"], ["demo", "--help"]):
        r = run_cli(*cmd)
        assert r.returncode == 0 and "usage: psdclip" in r.stdout
