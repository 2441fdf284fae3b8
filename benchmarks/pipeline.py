"""Pipeline benchmarks, side by side in one run, recorded in BENCHMARKS.md.

1. Download throughput: the same synthetic URL lists (6,000 and 3,000 images) served by a loopback server in its
   own process; images/s of the whole `psdclip data build` command and of the whole `img2dataset` command with
   the same settings (image size, encoding, thread and process counts, shard size), runs alternated.
   Goal: psdclip / img2dataset >= 0.95 at each size.
2. Read, clean and dedupe of a 1M-row URL list (realistic captions and URLs, 5% duplicate URLs, 1%
   invalid): rows/s through the same code path the build uses (Dask tasks + the client's global stages,
   plan written), excluding cluster start-up. Goal >= 200,000 rows/s.

3. What a download task carries: the pickled size of one download task's arguments (as the client submits it to
   the scheduler) for shards of 1,000 to 100,000 rows, beside what it carried before (the shard's rows as a
   frame). Goal: independent of rows per shard. Not a timing: it may run beside other work.

    python benchmarks/pipeline.py [--images 6000 3000] [--rows 1000000] [--repeats 2] [--out bench-out]
                                  [--only download|clean|task-args]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _record import record  # noqa: E402

from dask.distributed import get_task_stream  # noqa: E402

from psdclip.pipeline.build import dask_client  # noqa: E402
from psdclip.pipeline.ingest import ingest_inputs  # noqa: E402
from psdclip.pipeline.config import BuildConfig, SynthConfig  # noqa: E402
from psdclip.pipeline.dataset import Layout  # noqa: E402
from psdclip.pipeline.synth import generate, write_url_list  # noqa: E402

SETTINGS = dict(image_size=64, encode_quality=90, thread_count=32, processes=2, shard_size=1000, timeout=10)


def start_server(directory: str, port: int = 0):
    exe = os.path.join(os.path.dirname(sys.executable), "psdclip")
    proc = subprocess.Popen([exe, "data", "serve", directory, "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("serving"):
            return proc, line.split(" on ")[1].split(" ")[0]
    raise RuntimeError("server did not start")


def server_capacity(urls: list[str], threads: int = 32) -> float:
    def get(u):
        with urllib.request.urlopen(u, timeout=10) as r:
            return len(r.read())
    t = time.time()
    with concurrent.futures.ThreadPoolExecutor(threads) as ex:
        list(ex.map(get, urls))
    return len(urls) / (time.time() - t)


BIN = os.path.dirname(sys.executable)
# albumentations (imported by img2dataset) checks PyPI for a newer version at import: not part of a download
QUIET = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}


def _success_rows(out: str, pattern: str) -> int:
    import glob

    return int(sum(pd.read_parquet(f, columns=["status"])["status"].eq("success").sum()
                   for f in glob.glob(os.path.join(out, pattern))))


def run_img2dataset(url_list: str, out: str) -> tuple[float, int]:
    """The `img2dataset` command, whole (its start-up included)."""
    shutil.rmtree(out, ignore_errors=True)
    t = time.time()
    subprocess.run([os.path.join(BIN, "img2dataset"), "--url_list", url_list, "--input_format", "csv",
                    "--url_col", "url", "--caption_col", "caption", "--output_format", "webdataset",
                    "--output_folder", out, "--image_size", str(SETTINGS["image_size"]), "--resize_mode", "border",
                    "--encode_quality", str(SETTINGS["encode_quality"]),
                    "--thread_count", str(SETTINGS["thread_count"]),
                    "--processes_count", str(SETTINGS["processes"]), "--number_sample_per_shard",
                    str(SETTINGS["shard_size"]), "--timeout", str(SETTINGS["timeout"]), "--extract_exif", "False",
                    "--compute_hash", "sha256", "--enable_wandb", "False"],
                   check=True, capture_output=True, env=QUIET)
    return time.time() - t, _success_rows(out, "*.parquet")


def run_psdclip(url_list: str, out: str) -> tuple[float, int]:
    """The `psdclip data build` command, whole (its start-up and its Dask cluster's included)."""
    shutil.rmtree(out, ignore_errors=True)
    t = time.time()
    subprocess.run([os.path.join(BIN, "psdclip"), "data", "build", url_list, "--out", out, "--image-size",
                    str(SETTINGS["image_size"]), "--encode-quality", str(SETTINGS["encode_quality"]),
                    "--thread-count", str(SETTINGS["thread_count"]), "--processes-count", str(SETTINGS["processes"]),
                    "--shard-size", str(SETTINGS["shard_size"]), "--timeout", str(SETTINGS["timeout"]),
                    "--no-progress"], check=True, capture_output=True, env=QUIET)
    return time.time() - t, _success_rows(out, os.path.join("manifest", "*.parquet"))


def download_benchmark(args) -> tuple[str, list]:
    sections, ratios = [], []
    for n in args.images:
        body, ratio = _download_at(args, n)
        sections.append(body)
        ratios.append((n, ratio))
    summary = "; ".join(f"{n:,} images {r:.3f}" for n, r in ratios)
    return ("\n".join(sections) + f"\n**psdclip / img2dataset (medians): {summary}** (goal >= 0.95; the smaller list "
            f"weighs the fixed start-up of both commands more)\n"), ratios


def _download_at(args, n: int) -> tuple[str, float]:
    src = os.path.join(args.out, f"synth-{n}")
    if not os.path.isfile(os.path.join(src, "synth.json")):
        generate(SynthConfig(out=src, n=n, seed=0, heldout=0, image_size=96), progress=False)
    server, base = start_server(src)
    try:
        url_list = write_url_list(src, base, name="urls-bench.csv")
        urls = pd.read_csv(url_list)["url"].tolist()
        capacity = server_capacity(urls)
        rows = {"img2dataset": [], "psdclip": []}
        for _ in range(args.repeats):
            for name, fn in (("img2dataset", run_img2dataset), ("psdclip", run_psdclip)):
                wall, ok = fn(url_list, os.path.join(args.out, f"dl-{name}"))
                rows[name].append(ok / wall)
                print(f"{n}: {name}: {ok} images in {wall:.1f} s = {ok / wall:.0f} images/s", flush=True)
    finally:
        server.terminate()
        server.wait()
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratio = med["psdclip"] / med["img2dataset"]
    table = "\n".join(f"| {k} | {', '.join(f'{x:.0f}' for x in v)} | {med[k]:.0f} |" for k, v in rows.items())
    return (f"{n:,} synthetic 96 px JPEGs served by `psdclip data serve` (its own process) on 127.0.0.1; "
            f"the server alone delivers {capacity:.0f} images/s to 32 threads. Same settings for both: "
            f"image_size {SETTINGS['image_size']}, border resize, jpg q{SETTINGS['encode_quality']}, "
            f"{SETTINGS['processes']} processes x {SETTINGS['thread_count']} threads, {SETTINGS['shard_size']} "
            f"per shard, sha256 on, exif off. Wall time of the whole command (`img2dataset ...` and `psdclip data "
            f"build ...` as processes, start-up included), runs alternated.\n\n| downloader | images/s per run | "
            f"median |\n|---|---|---|\n{table}\n\npsdclip / img2dataset = {ratio:.3f}\n"), ratio


def make_url_list(path: str, n: int, parts: int = 1) -> list[str]:
    rng = np.random.default_rng(0)
    words = np.array("red blue small large dog cat car house tree river mountain sunset city street beach photo "
                     "portrait old new vintage modern wooden glass table chair flower garden bird sky night "
                     "winter summer child woman man group food plate coffee book window door road".split())
    accented = np.array(["café", "naïve", "crème brûlée", "São Paulo", "Zürich", "niño", "façade", "Ærø"])
    caps = [" ".join(words[rng.integers(0, len(words), rng.integers(3, 12))]) for _ in range(n)]
    kind = rng.random(n)
    for i in np.flatnonzero(kind < 0.08):
        caps[i] = f"{caps[i]} {accented[i % len(accented)]}"
    for i in np.flatnonzero((kind >= 0.08) & (kind < 0.09)):
        caps[i] = f"{caps[i]} cafÃ© naÃ¯ve"  # mojibake
    for i in np.flatnonzero((kind >= 0.09) & (kind < 0.10)):
        caps[i] = f"{caps[i]} &amp; more"
    for i in np.flatnonzero((kind >= 0.10) & (kind < 0.15)):
        caps[i] = f"  {caps[i]}\t "
    for i in np.flatnonzero((kind >= 0.15) & (kind < 0.17)):
        caps[i] = ""
    hosts = np.array([f"img{i}.cdn{i % 37}.example.com" for i in range(5000)])
    host_idx = np.minimum(rng.zipf(1.3, n), len(hosts)) - 1
    urls = np.array([f"https://{hosts[h]}/photos/{rng.integers(1e12)}/{i}.jpg" for i, h in enumerate(host_idx)],
                    dtype=object)
    dup = rng.random(n) < 0.05
    urls[dup] = urls[rng.integers(0, n, int(dup.sum()))]
    urls[rng.random(n) < 0.01] = "file:///etc/passwd"
    df = pd.DataFrame({"url": urls, "caption": caps})
    paths = []
    for k, chunk in enumerate(np.array_split(np.arange(n), parts)):
        p = path if parts == 1 else path.replace(".csv", f"-{k}.csv")
        df.iloc[chunk].to_csv(p, index=False)
        paths.append(p)
    return paths


def _phases(records) -> str:
    """Per task kind (the key's prefix: read, sha256, dedupe, deal, group): its wall-clock span from the first task's
    start to the last one's end, and the compute seconds summed over its tasks."""
    spans: dict[str, list] = {}
    for r in records:
        kind = r["key"].split("-")[0]
        for ss in r["startstops"]:
            if ss["action"] == "compute":
                lo, hi, total = spans.get(kind, [ss["start"], ss["stop"], 0.0])
                spans[kind] = [min(lo, ss["start"]), max(hi, ss["stop"]), total + ss["stop"] - ss["start"]]
    return ", ".join(f"{k} {hi - lo:.2f} s ({c:.2f})" for k, (lo, hi, c) in sorted(spans.items(), key=lambda kv: kv[1][0]))


def clean_benchmark(args) -> str:
    lines = []
    for parts in (1, 4):
        paths = make_url_list(os.path.join(args.out, f"list-{args.rows}.csv"), args.rows, parts)
        times = []
        for _ in range(args.repeats):
            out = os.path.join(args.out, "clean-ds")
            shutil.rmtree(out, ignore_errors=True)
            cfg = BuildConfig(inputs=paths, out=out, progress=False)
            layout = Layout(out)
            layout.create()
            with dask_client(None, 2, os.path.join(layout.work, "dask")) as client:
                client.run(lambda: None)  # workers up
                t = time.time()
                with get_task_stream(client) as stream:
                    plan = ingest_inputs(client, layout, cfg)
                times.append(time.time() - t)
            assert plan["rows"] == args.rows
            if times[-1] == min(times):
                phases = _phases(stream.data)
        best = min(times)
        counts = plan["statuses"]
        lines.append(f"| {parts} file(s) | {', '.join(f'{x:.2f}' for x in times)} | {args.rows / best:,.0f} | "
                     f"{phases} |")
        print(lines[-1], counts, flush=True)
    return (f"{args.rows:,} rows (5% duplicate URLs, 1% file:// URLs, 2% empty captions, 10% captions with accents, "
            f"mojibake or HTML entities, Zipf-distributed hosts): read -> ftfy/whitespace -> caption and URL "
            f"filters -> URL keys (Dask tasks over parts of the lists on a 2-process LocalCluster) -> duplicate URLs "
            f"and keys (a task per URL-key bucket) -> host spreading and shard assignment (a task per bucket, then per "
            f"group of shards) -> the plan written as shard input files. Cluster start-up excluded.\n\n"
            f"| input | seconds per run | rows/s (best run) | task phases of the best run: wall span (compute s "
            f"summed over tasks) |\n|---|---|---|---|\n" + "\n".join(lines) +
            f"\n\nstatuses: {counts}\n\nGoal >= 200,000 rows/s.\n")


def task_args_benchmark(args) -> str:
    import cloudpickle

    from psdclip.pipeline.build import _pending_shards
    from psdclip.pipeline.download import DownloadOptions

    lines = []
    for rows in (1_000, 10_000, 100_000):
        out = os.path.join(args.out, f"task-args-{rows}")
        shutil.rmtree(out, ignore_errors=True)
        paths = make_url_list(os.path.join(args.out, f"task-args-{rows}.csv"), rows)
        cfg = BuildConfig(inputs=paths, out=out, progress=False, shard_size=rows)
        layout = Layout(out)
        layout.create()
        with dask_client(None, 1, os.path.join(layout.work, "dask")) as client:
            ingest_inputs(client, layout, cfg)
        shard, (path, n) = next(iter(_pending_shards(layout).items()))
        now = len(cloudpickle.dumps((path, shard, layout.root, DownloadOptions.of(cfg))))
        frame = layout.load_plan(0)
        frame = frame[frame["shard"] == shard][["key", "url", "caption", "order"]].reset_index(drop=True)
        before = len(cloudpickle.dumps((frame, shard, layout.root, DownloadOptions.of(cfg))))
        lines.append(f"| {n:,} | {now:,} | {before:,} ({before / n:.0f} bytes/row) |")
        print(lines[-1], flush=True)
    return ("Pickled arguments of one `download_partition` task (cloudpickle, as Dask sends them), for a shard of "
            "N pending rows of the benchmark's URL list: now (the shard's input file path, shard id, dataset folder, "
            "options) beside before (the shard's rows as a frame).\n\n"
            "| rows in the shard | bytes now | bytes before |\n|---|---|---|\n" + "\n".join(lines) +
            "\n\nGoal: independent of rows per shard.\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, nargs="+", default=[6000, 3000], help="list sizes (images)")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--only", choices=["download", "clean", "task-args"])
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.only in (None, "task-args"):
        record("pipeline-task-args", "Pipeline: what a download task carries", task_args_benchmark(args))
    if args.only in (None, "download"):
        body, _ = download_benchmark(args)
        record("pipeline-download", "Pipeline: download throughput vs plain img2dataset", body)
    if args.only in (None, "clean"):
        record("pipeline-clean", "Pipeline: read, clean and dedupe of a 1M-row URL list", clean_benchmark(args))


if __name__ == "__main__":
    main()
