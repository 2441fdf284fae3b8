"""Service load benchmark, recorded in BENCHMARKS.md: `psdclip serve` (uvicorn, one process) on the demo's
index (`psdclip demo --out bench-out/demo` is run when it is missing), 32 concurrent clients in a closed loop
for 60 s on loopback: QPS, p50/p99 latency and errors, for text queries (each is encoded by the model) and
for embedding queries (index and metadata only), with the text-embedding cache off and on (text queries
all distinct, and Zipf-repeated; the hit rate from the service's /metrics). The load comes from wrk (C; `apt install wrk`) when it is
installed, so that the generator takes little of the CPU the service runs on, else from httpx/asyncio.

    python benchmarks/service.py [--seconds 60] [--clients 32] [--index DIR] [--workers 1 2]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _record import record  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(base: str, bodies: list[dict], clients: int, seconds: float) -> dict:
    import httpx

    lat, errors = [], 0
    deadline = time.perf_counter() + seconds

    async def client(i):
        nonlocal errors
        async with httpx.AsyncClient(base_url=base, timeout=10) as c:
            k = i
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                try:
                    r = await c.post("/search", json=bodies[k % len(bodies)])
                    if r.status_code != 200:
                        errors += 1
                except httpx.HTTPError:
                    errors += 1
                lat.append(time.perf_counter() - t)
                k += clients
    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    a = np.array(lat) * 1000
    return {"requests": len(a), "qps": len(a) / wall, "p50": float(np.percentile(a, 50)),
            "p99": float(np.percentile(a, 99)), "errors": errors}


def start_service(exe: str, idx: str, *args: str, wait_s: float = 60) -> tuple[subprocess.Popen, str]:
    """`psdclip serve IDX ARGS` on a free loopback port, once /healthz answers: (process, base URL)."""
    import httpx

    port = free_port()
    server = subprocess.Popen([exe, "serve", idx, "--port", str(port), *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + wait_s
    while time.time() < deadline:
        try:
            if httpx.get(base + "/healthz").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    return server, base


WRK_SCRIPT = """
local bodies = {}
for line in io.lines(os.getenv("PSDCLIP_BODIES")) do bodies[#bodies + 1] = line end
local path = os.getenv("PSDCLIP_PATH") or "/search"
local threads, i = 0, 0
function setup(thread)  -- each of the 2 threads takes every other body, so that distinct bodies stay distinct
  thread:set("id", threads)
  threads = threads + 1
end
request = function()
  i = i + 1
  return wrk.format("POST", path, {["Content-Type"] = "application/json"}, bodies[((2 * i + id) % #bodies) + 1])
end
done = function(summary, latency, requests)
  io.write(string.format("PSDCLIP %d %f %f %f %d %d\\n", summary.requests, summary.duration / 1e6,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write +
    summary.errors.timeout, summary.errors.status))
end
"""


def load_wrk(base: str, bodies: list[dict], clients: int, seconds: float, tmp: str, path: str = "/search") -> dict:
    body_file, script = os.path.join(tmp, "bodies.jsonl"), os.path.join(tmp, "load.lua")
    with open(body_file, "w") as f:
        f.write("\n".join(json.dumps(b) for b in bodies) + "\n")
    with open(script, "w") as f:
        f.write(WRK_SCRIPT)
    out = subprocess.run(["wrk", "-t", str(min(2, clients)), "-c", str(clients), "-d", f"{int(seconds)}s",
                          "--timeout", "10s", "-s", script, base], capture_output=True, text=True, check=True,
                         env={**os.environ, "PSDCLIP_BODIES": body_file, "PSDCLIP_PATH": path}).stdout
    fields = next(line for line in out.splitlines() if line.startswith("PSDCLIP ")).split()
    n, wall, p50, p99, errors = int(fields[1]), float(fields[2]), float(fields[3]), float(fields[4]), int(fields[5])
    return {"requests": n, "qps": n / wall, "p50": p50, "p99": p99, "errors": errors}


def demo_index(idx: str, default: str) -> tuple[str, str]:
    """(the psdclip executable, the index): the demo's, made by `psdclip demo` when it is missing."""
    exe = os.path.join(os.path.dirname(sys.executable), "psdclip")
    if not os.path.isfile(os.path.join(idx, "index.json")):
        if idx != default:
            raise SystemExit(f"{idx}: not a psdclip index")
        subprocess.run([exe, "demo", "--out", os.path.dirname(idx)], check=True, capture_output=True)
    return exe, idx


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--index", default="bench-out/demo/index")
    ap.add_argument("--generator", choices=["auto", "wrk", "httpx"], default="auto")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="service processes (`serve --workers`)")
    args = ap.parse_args()
    exe, idx = demo_index(args.index, ap.get_default("index"))
    import shutil
    import tempfile

    import pyarrow.feather as pa_feather

    generator = ("wrk" if shutil.which("wrk") else "httpx") if args.generator == "auto" else args.generator
    tmp = tempfile.mkdtemp()
    meta = json.load(open(os.path.join(idx, "index.json")))
    caps = pa_feather.read_table(os.path.join(idx, "metadata.arrow")).column("caption").to_pylist()
    rng = np.random.default_rng(0)
    n = 200_000  # more than a run sends: every text query is one the service has not seen
    distinct = [{"text": f"{caps[i % len(caps)]} {i}", "k": 10} for i in range(n)]
    # web search's repeats: 2,000 queries drawn with Zipf(1.1) frequencies (a few are very common)
    pool = [caps[i] for i in rng.choice(len(caps), 2000, replace=False)]
    ranks = np.minimum(rng.zipf(1.1, n), 2000) - 1
    zipf = [{"text": pool[r], "k": 10} for r in ranks]
    embs = rng.normal(size=(200, int(meta["dim"])))
    workloads = {"text, all distinct": distinct, "text, Zipf-repeated": zipf,
                 "embedding": [{"embedding": e.tolist(), "k": 10} for e in embs]}
    results = {}
    # (workers, text runtime, cache): every workload; and the text tower in eager mode, for comparison, on the
    # one workload it decides (all-distinct texts, no cache)
    runs = [(w, "torchscript", cache, list(workloads)) for w in args.workers for cache in (0, 10_000)]
    runs.append((args.workers[0], "eager", 0, ["text, all distinct"]))
    for workers, runtime, cache, names in runs:
        server, base = start_service(exe, idx, "--text-cache", str(cache), "--workers", str(workers),
                                     "--text-runtime", runtime)
        try:
            for name in names:
                if name == "embedding" and cache:
                    continue  # no text to cache
                before = _cache_counts(base)
                r = load_wrk(base, workloads[name], args.clients, args.seconds, tmp) if generator == "wrk" else \
                    asyncio.run(load(base, workloads[name], args.clients, args.seconds))
                hits, misses = (a - b for a, b in zip(_cache_counts(base), before))
                r["hit_rate"] = hits / max(1, hits + misses) if name != "embedding" else None
                results[(workers, runtime, name, cache)] = r
                print(workers, runtime, name, cache, r, flush=True)
        finally:
            server.terminate()
            server.wait()
    rows = "\n".join(
        f"| {workers} | {runtime} | {name} | {'on (10,000)' if cache else 'off'} | {v['requests']:,} | "
        f"{v['qps']:.0f} | {v['p50']:.1f} | {v['p99']:.1f} | {v['errors']} | {_rate(v['hit_rate'])} |"
        for (workers, runtime, name, cache), v in results.items())
    body = (f"`psdclip serve --workers W` (W uvicorn processes sharing the port and the memory-mapped index, each "
            f"with the demo's model on CPU and 1 thread (`--threads`, the default), concurrent queries answered in "
            f"batches; the text tower as TorchScript traces, or eager PyTorch for comparison) "
            f"over the demo's {meta['count']:,}-image `{meta['factory']}` index; {args.clients} concurrent clients in "
            f"a closed loop for {args.seconds:.0f} s each, load from {generator} in another process on the same 2 "
            f"cores, k=10. Text queries either all distinct (no cache can help) or drawn from 2,000 captions with "
            f"Zipf(1.1) frequencies; the hit rate is read from the service's /metrics.\n\n"
            f"| workers | text tower | query | text cache | requests | QPS | p50 ms | p99 ms | errors | "
            f"cache hit rate |\n"
            f"|---|---|---|---|---|---|---|---|---|---|\n{rows}\n\nGoal: p99 <= 25 ms with no errors. In a closed loop "
            f"latency is clients / throughput, so p99 <= 25 ms at 32 clients needs more than 1,280 QPS on 2 cores "
            f"shared with the load generator.\n")
    record("service-load", "Service: 32 concurrent clients on loopback", body)


def _rate(x) -> str:
    return "" if x is None else f"{x:.1%}"


def _cache_counts(base: str) -> tuple[float, float]:
    """(hits, misses) of the text-embedding cache over all indices, from /metrics."""
    import httpx

    hits = misses = 0.0
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith("psdclip_text_cache_hits{"):
            hits += float(line.rsplit(" ", 1)[1])
        elif line.startswith("psdclip_text_cache_misses{"):
            misses += float(line.rsplit(" ", 1)[1])
    return hits, misses

if __name__ == "__main__":
    main()
