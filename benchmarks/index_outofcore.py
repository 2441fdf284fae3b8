"""Out-of-core index benchmark, recorded in BENCHMARKS.md (issue 12's measures, side by side in one run):

1. N x D clustered vectors (as benchmarks/index.py makes them) written as embedding parts in clip-retrieval's
   layout, chunk by chunk; `psdclip index build --embeddings` in its own process: peak RSS (the kernel's
   ru_maxrss of that process) against the raw vectors' size (goal <= 25%), build time; then recall@10 against
   exact search on 1,000 held-out queries (perturbed database vectors) and QPS of both, exact search streamed
   over the parts.
2. `psdclip serve` over that index (embedding queries: no model): RSS after start-up against the index files'
   size (goal <= 10%, memory-mapped), p50/p99 at 32 clients (wrk), and the same load while /admin/reload runs.
3. Embedding throughput of `index build` on the demo dataset with 1 and 2 torchrun processes, and whether the
   vectors are identical.

    python benchmarks/index_outofcore.py [--n 10000000] [--d 256] [--factory IVF4096,SQ8] [--max-build-memory 1.5GB]
        [--target-recall 0.97]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _record import record  # noqa: E402
from index import embedding_chunks  # noqa: E402
from service import load_wrk, start_service  # noqa: E402

BIN = os.path.dirname(sys.executable)


def write_parts(root: str, n: int, d: int, part_rows: int, chunk: int = 100_000) -> None:
    """Parts of part_rows vectors (a multiple of the generator's chunk), each with its metadata file."""
    import pandas as pd

    assert part_rows % chunk == 0
    for sub in ("img_emb", "metadata"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    arr = None
    for start, x in zip(range(0, n, chunk), embedding_chunks(n, d, 20_000, 0, chunk)):
        part, at = divmod(start, part_rows)
        if at == 0:
            rows = min(part_rows, n - start)
            arr = np.lib.format.open_memmap(os.path.join(root, "img_emb", f"img_emb_{part:05d}.npy"), "w+",
                                            np.float32, (rows, d))
            ids = np.arange(start, start + rows)
            pd.DataFrame({"key": [f"{i:010d}" for i in ids], "caption": [f"vector {i}" for i in ids],
                          "url": [f"https://example.invalid/{i}.jpg" for i in ids]}).to_parquet(
                os.path.join(root, "metadata", f"metadata_{part:05d}.parquet"))
        arr[at:at + len(x)] = x
        if at + len(x) == len(arr):
            arr.flush()
            del arr


def rss(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "RssAnon", "RssFile", "VmHWM")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--factory", default="IVF4096,SQ8")
    ap.add_argument("--max-build-memory", default="1.5GB")
    ap.add_argument("--target-recall", default="0.97", help="index build's tuning target on its own held-out "
                    "queries (vectors of the collection, easier than the perturbed queries measured here)")
    ap.add_argument("--work", default="bench-out/outofcore")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--demo", default="bench-out/demo")
    args = ap.parse_args()
    from psdclip.index import ann
    from psdclip.index import parts as P

    exe = os.path.join(BIN, "psdclip")
    emb, idx = os.path.join(args.work, f"emb-{args.n}x{args.d}"), os.path.join(args.work, "index")
    raw = args.n * args.d * 4
    if not os.path.isfile(os.path.join(emb, "done")):
        shutil.rmtree(emb, ignore_errors=True)
        t = time.time()
        write_parts(emb, args.n, args.d, 1_000_000)
        open(os.path.join(emb, "done"), "w").close()
        print(f"wrote {raw / 1e9:.1f} GB of parts in {time.time() - t:.0f} s", flush=True)
    parts, _ = P.list_parts(emb)
    shutil.rmtree(idx, ignore_errors=True)
    # 1. the build, in its own process; its peak RSS from the kernel
    t = time.perf_counter()
    p = subprocess.Popen([exe, "index", "build", "--embeddings", emb, "--out", idx, "--factory", args.factory,
                          "--max-build-memory", args.max_build_memory, "--target-recall", args.target_recall,
                          "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    build_s = time.perf_counter() - t
    out = p.stdout.read().decode() + p.stderr.read().decode()
    if status != 0:
        raise SystemExit(f"index build failed:\n{out[-3000:]}")
    peak = usage.ru_maxrss * 1024
    info = json.load(open(os.path.join(idx, "index.json")))
    print(f"built in {build_s:.0f} s, peak RSS {peak / 1e9:.2f} GB ({peak / raw:.1%} of raw); {info['layout']}",
          flush=True)
    # recall and QPS against exact search (streamed over the parts), 1,000 held-out queries
    rng = np.random.default_rng(3)
    q = P.gather(parts, "image", rng.integers(0, args.n, 1000))
    q += 0.3 * rng.standard_normal(q.shape, dtype=np.float32) / np.sqrt(args.d)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    t = time.perf_counter()
    _, exact = ann.exact_knn_streamed(parts, "image", q, 10)
    exact_qps = len(q) / (time.perf_counter() - t)
    from psdclip.index.searcher import Searcher

    s = Searcher(idx)
    index = s.indices["image"]
    index.search(q[:10], 10)
    t = time.perf_counter()
    _, approx = index.search(q, 10)
    ann_qps = len(q) / (time.perf_counter() - t)
    recall = ann.recall_at_k(approx, exact, 10)
    del s, index
    print(f"recall@10 {recall:.3f}, {ann_qps:.0f} vs exact {exact_qps:.1f} QPS", flush=True)
    files = sum(os.path.getsize(os.path.join(idx, f)) for f in info["files"]["index.faiss"])
    # 2. the service over it: memory after start-up, load, and load during a reload
    import httpx

    server, base = start_service(exe, idx, "--api-key", "bench")
    service = {}
    try:
        service["start"] = rss(server.pid)
        bodies = [{"embedding": v.tolist(), "k": 10} for v in q[:200]]
        # warm-up: the first queries page the index files in from disk (a fresh build's files may not be cached)
        t = time.perf_counter()
        for v in q[200:400]:
            httpx.post(base + "/search", json={"embedding": v.tolist(), "k": 10}, timeout=600)
        service["warmup_s"] = time.perf_counter() - t
        tmp = os.path.join(args.work, "wrk")
        os.makedirs(tmp, exist_ok=True)
        service["load"] = load_wrk(base, bodies, 32, args.seconds, tmp)
        service["after_load"] = rss(server.pid)
        reloads = []

        def reload():
            time.sleep(args.seconds / 4)
            t0 = time.perf_counter()
            r = httpx.post(base + "/admin/reload", headers={"X-API-Key": "bench"}, timeout=600)
            reloads.append((r.status_code, time.perf_counter() - t0))

        th = threading.Thread(target=reload)
        th.start()
        service["reload_load"] = load_wrk(base, bodies, 32, args.seconds, tmp)
        th.join()
        service["reload"] = reloads[0]
        service["after_reload"] = rss(server.pid)
    finally:
        server.terminate()
        server.wait()
    print(service, flush=True)
    # 3. embedding throughput, 1 vs 2 torchrun processes, on the demo dataset
    emb_rows = []
    run = os.path.join(args.demo, "runs", "psd")
    data = os.path.join(args.demo, "dataset")
    vectors = {}
    if os.path.isdir(run) and os.path.isdir(data):
        for procs in (1, 2):
            out_dir = os.path.join(args.work, f"embed-{procs}")
            shutil.rmtree(out_dir, ignore_errors=True)
            env = {**os.environ, "OMP_NUM_THREADS": str(2 // procs)}
            t = time.perf_counter()
            subprocess.run([os.path.join(BIN, "torchrun"), "--standalone", "--nproc-per-node", str(procs), "-m",
                            "psdclip.workflows.cli", "index", "build", "--checkpoint", run, "--data", data, "--out",
                            out_dir, "--no-progress", "--workers", "1"], check=True, capture_output=True, env=env)
            wall = time.perf_counter() - t
            doc = json.load(open(os.path.join(out_dir, "index.json")))
            got, _ = P.list_parts(os.path.join(out_dir, "embeddings"))
            vectors[procs] = np.concatenate([np.load(p_.image) for p_ in got])
            emb_rows.append((procs, doc["count"], doc["embed_s"], wall))
        same = np.array_equal(vectors[1], vectors[2])
        diff = float(np.abs(vectors[1].astype(np.float64) - vectors[2]).max())
    body = (f"{args.n:,} x {args.d} float32 vectors ({raw / 1e9:.2f} GB raw; 20,000 anisotropic clusters, "
            f"normalised) as {len(parts)} parts in clip-retrieval's layout; `--factory {args.factory} "
            f"--max-build-memory {args.max_build_memory} --target-recall {args.target_recall}` (the factory is given: SQ8 codes in plain inverted lists can be "
            f"memory-mapped, while 4-bit fast-scan lists load into RAM; and 16,384 lists, the rule's nlist at 10M, "
            f"take most of an hour of k-means on 2 cores). Layout chosen by the build: {info['layout']['index.faiss']}; tuned "
            f"{info['search_params']['index.faiss']}.\n\n"
            f"| measure | value | goal |\n|---|---|---|\n"
            f"| build wall time (embeddings given) | {build_s:.0f} s | |\n"
            f"| build peak RSS | {peak / 1e9:.2f} GB = {peak / raw:.1%} of the raw vectors | <= 25% |\n"
            f"| recall@10 vs exact, 1,000 held-out queries | {recall:.3f} | >= 0.95 |\n"
            f"| QPS, batch of 1,000: index / exact (streamed) | {ann_qps:,.0f} / {exact_qps:,.1f} "
            f"({ann_qps / exact_qps:.0f}x) | |\n"
            f"| index files | {files / 1e9:.2f} GB | |\n"
            f"| warm-up: 200 sequential queries before the load (pages the index in) | {service['warmup_s']:.1f} s | |\n"
            f"| service RSS after start-up (anon + file) | {service['start']['VmRSS'] / 1e6:.0f} MB "
            f"({service['start']['RssAnon'] / 1e6:.0f} + {service['start']['RssFile'] / 1e6:.0f}) = "
            f"{service['start']['VmRSS'] / files:.1%} of the index files | <= 10% |\n"
            f"| embedding queries, 32 clients, {args.seconds:.0f} s | {service['load']['qps']:.0f} QPS, p50 "
            f"{service['load']['p50']:.1f} ms, p99 {service['load']['p99']:.1f} ms, {service['load']['errors']} errors"
            f" | |\n"
            f"| the same while /admin/reload runs ({service['reload'][1]:.1f} s, HTTP {service['reload'][0]}) | "
            f"{service['reload_load']['qps']:.0f} QPS, p50 {service['reload_load']['p50']:.1f} ms, p99 "
            f"{service['reload_load']['p99']:.1f} ms, {service['reload_load']['errors']} errors | no error |\n"
            f"| service RSS after load / after the reload | {service['after_load']['VmRSS'] / 1e6:.0f} / "
            f"{service['after_reload']['VmRSS'] / 1e6:.0f} MB (anon {service['after_load']['RssAnon'] / 1e6:.0f} / "
            f"{service['after_reload']['RssAnon'] / 1e6:.0f} MB) | |\n")
    if emb_rows:
        body += ("\nEmbedding step of `index build` on the demo dataset (`torchrun --nproc-per-node P`, one loader "
                 "worker per process, OMP threads 2/P):\n\n| processes | images | embed s | images/s | whole command s |"
                 "\n|---|---|---|---|---|\n" +
                 "".join(f"| {p_} | {n_:,} | {e:.1f} | {n_ / e:.0f} | {w:.1f} |\n" for p_, n_, e, w in emb_rows) +
                 f"\nVectors of 1 and 2 processes bit-identical: **{same}** (largest difference {diff:.2e}; the two "
                 f"runs use 2 and 1 OMP threads per process).\n")
    record("index-outofcore", f"Index out of core: {args.n:,} x {args.d}, build memory, mmap serving", body)


if __name__ == "__main__":
    main()
