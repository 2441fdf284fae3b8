"""Peak memory of a whole `psdclip data build` as the URL list grows (issue 11's scale measure).

For each size N, a URL list of N rows where all but --real rows are filtered in the clean stage (half of them
have an empty caption, half a URL that is not http(s)) and the --real rows point at the project's synthetic
images on a loopback server (distinct URLs, so they are downloaded), so the run is about the bookkeeping, not
the bytes. The build runs as its own process (`psdclip data build ... --dask-scheduler`), against a Dask
scheduler and 2 workers started as separate processes (`dask scheduler`, `dask worker`), so that the client's
and the scheduler's resident memory are measured apart: peak RSS sampled every 0.1 s, over plan, download,
manifest and subsets. Goal: peak RSS at 10M rows / peak RSS at 1M rows <= 1.5 for both processes. Memory is not
a timing: this may run beside other work (the wall times it prints are then only indicative).

    python benchmarks/pipeline_memory.py [--rows 1000000 10000000] [--real 20000] [--out bench-out]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.csv as pcsv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _record import record  # noqa: E402
from pipeline import start_server  # noqa: E402

from psdclip.pipeline.config import SynthConfig  # noqa: E402
from psdclip.pipeline.synth import generate  # noqa: E402

BIN = os.path.dirname(sys.executable)


def make_list(path: str, n: int, real: int, base: str, images: list[str]) -> None:
    """n rows: `real` distinct loopback URLs of synthetic images, the rest filtered by the clean stage."""
    i = np.arange(n)
    real_rows = np.zeros(n, bool)
    real_rows[np.random.default_rng(0).choice(n, min(real, n), replace=False)] = True
    img = np.array(images, dtype=object)[i % len(images)]
    q = i.astype(str).astype(object)
    url = np.where(real_rows, base.rstrip("/") + "/" + img + "?v=" + q,
                   np.where(i % 2 == 0, "https://img" + (i % 5000).astype(str).astype(object) + ".example.com/p/" + q
                            + ".jpg", "ftp://files.example.com/" + q + ".jpg"))
    caption = np.where(real_rows | (i % 2 == 1), "a photo of a thing number " + q, "")
    pcsv.write_csv(pa.table({"url": pa.array(url, pa.string()), "caption": pa.array(caption, pa.string())}), path)


def peak_rss(pids: dict[str, int], stop: threading.Event, out: dict[str, int]) -> None:
    procs = {name: psutil.Process(pid) for name, pid in pids.items()}
    while not stop.is_set():
        for name, p in procs.items():
            try:
                out[name] = max(out.get(name, 0), p.memory_info().rss)
            except psutil.Error:
                pass
        time.sleep(0.1)


def one(n: int, args, base: str, images: list[str]) -> dict:
    work = os.path.join(args.out, f"memory-{n}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    lst = os.path.join(work, "urls.csv")
    t = time.time()
    make_list(lst, n, args.real, base, images)
    print(f"{n:,} rows: list written in {time.time() - t:.0f} s", flush=True)
    sched_file = os.path.join(work, "scheduler.json")
    sched = subprocess.Popen([os.path.join(BIN, "dask"), "scheduler", "--port", "0", "--dashboard-address", ":0",
                              "--scheduler-file", sched_file], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = None
    try:
        while not os.path.isfile(sched_file):
            time.sleep(0.2)
        import json

        time.sleep(0.5)
        address = json.load(open(sched_file))["address"]
        workers = subprocess.Popen([os.path.join(BIN, "dask"), "worker", address, "--nworkers", "2", "--nthreads", "1",
                                    "--local-directory", tempfile.mkdtemp(dir=work)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        from dask.distributed import Client

        with Client(address, timeout="60s") as c:
            c.wait_for_workers(2, timeout=120)
        t = time.time()
        build = subprocess.Popen([os.path.join(BIN, "psdclip"), "data", "build", lst, "--out", os.path.join(work, "ds"),
                                  "--dask-scheduler", address, "--subsets", "0.01,0.1,1.0", "--shard-size", "1000",
                                  "--image-size", "32", "--thread-count", "32", "--no-progress"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        stop, peaks = threading.Event(), {}
        poll = threading.Thread(target=peak_rss, args=({"client": build.pid, "scheduler": sched.pid}, stop, peaks))
        poll.start()
        err = build.communicate()[1]
        stop.set()
        poll.join()
        if build.returncode:
            raise RuntimeError(f"build failed: {err[-2000:]}")
        return {"rows": n, "wall_s": time.time() - t, **peaks}
    finally:
        for p in (workers, sched):
            if p is not None:
                p.terminate()
                p.wait(timeout=60)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--real", type=int, default=20_000)
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    src = os.path.join(args.out, "memory-synth")
    if not os.path.isfile(os.path.join(src, "synth.json")):
        generate(SynthConfig(out=src, n=2000, seed=0, heldout=0, image_size=64), progress=False)
    import pandas as pd

    images = pd.read_parquet(os.path.join(src, "attributes.parquet"))["path"].tolist()
    server, base = start_server(src)
    try:
        results = [one(n, args, base, images) for n in args.rows]
    finally:
        server.terminate()
    rows = [f"| {r['rows']:,} | {r['client'] / 2**20:,.0f} | {r['scheduler'] / 2**20:,.0f} | {r['wall_s']:.0f} |"
            for r in results]
    for line in rows:
        print(line)
    first, last = results[0], results[-1]
    ratio = {k: last[k] / first[k] for k in ("client", "scheduler")}
    body = (f"`psdclip data build` of URL lists of N rows, all but {args.real:,} filtered in the clean stage (empty "
            f"captions, non-http URLs), the {args.real:,} others distinct loopback URLs of synthetic images; subsets "
            f"0.01,0.1,1.0; shards of 1,000 rows; a `dask scheduler` and 2 `dask worker` processes of their own. Peak "
            f"RSS sampled every 0.1 s over the whole build.\n\n"
            f"| rows | client peak RSS (MiB) | scheduler peak RSS (MiB) | wall (s) |\n|---|---|---|---|\n"
            + "\n".join(rows) +
            f"\n\n**peak RSS at {last['rows']:,} / at {first['rows']:,} rows: client {ratio['client']:.2f}, scheduler "
            f"{ratio['scheduler']:.2f}** (goal <= 1.5 for both).\n")
    record("pipeline-memory", "Pipeline: peak memory of a build as the URL list grows", body)


if __name__ == "__main__":
    main()
