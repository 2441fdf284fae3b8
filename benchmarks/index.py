"""Index benchmark, recorded in BENCHMARKS.md: 1M x 512 clustered vectors shaped like real embeddings
(a mixture of 20,000 anisotropic clusters, L2-normalised), a 2 GB memory budget and a 10 ms latency
budget. The index psdclip chooses is built (build time), tuned to recall@10 >= 0.95 on 500 held-out
queries, then measured side by side with exact search on 1,000 fresh queries: recall@10 and QPS (batched,
and one query at a time). Goal: recall >= 0.95 at >= 10x the exact QPS.

    python benchmarks/index.py [--n 1000000] [--d 512]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import faiss
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _record import record  # noqa: E402

from psdclip.index import ann  # noqa: E402


def embedding_chunks(n: int, d: int, clusters: int, seed: int, chunk: int = 100_000):
    """n clustered vectors shaped like real embeddings, chunk by chunk (never all in memory)."""
    rng = np.random.default_rng(seed)
    scale = (np.arange(1, d + 1) ** -0.5).astype(np.float32)  # a decaying spectrum, as real embeddings have
    centers = rng.standard_normal((clusters, d), dtype=np.float32) * scale
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centers[rng.integers(0, clusters, m)] + 0.6 * rng.standard_normal((m, d), dtype=np.float32) * scale
        yield x / np.linalg.norm(x, axis=1, keepdims=True)


def embeddings(n: int, d: int, clusters: int, seed: int) -> np.ndarray:
    return np.concatenate(list(embedding_chunks(n, d, clusters, seed)))


def qps(search, xq, one_by_one: int = 200) -> tuple[float, float]:
    t = time.perf_counter()
    search(xq)
    batched = len(xq) / (time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(one_by_one):
        search(xq[i:i + 1])
    single = one_by_one / (time.perf_counter() - t)
    return batched, single


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--max-memory", type=float, default=2e9)
    args = ap.parse_args()
    t = time.time()
    xb = embeddings(args.n, args.d, 20_000, 0)
    # queries: perturbed database vectors (a query lands near, not on, what it looks for)
    def queries(m, seed):
        r = np.random.default_rng(seed)
        q = xb[r.integers(0, args.n, m)] + 0.3 * r.standard_normal((m, args.d), dtype=np.float32) / np.sqrt(args.d)
        return q / np.linalg.norm(q, axis=1, keepdims=True)
    tune_q, test_q = queries(500, 2), queries(1000, 3)
    print(f"data {time.time() - t:.1f} s", flush=True)
    factory, why = ann.choose_factory(args.n, args.d, args.max_memory, 10.0)
    t = time.time()
    index = ann.build(xb, factory)
    build_s = time.time() - t
    print(f"{factory}: built in {build_s:.1f} s", flush=True)
    t = time.time()
    tuned = ann.tune(index, factory, ann.exact_knn(xb, tune_q, 10)[1], tune_q, 10, 0.95)
    tune_s = time.time() - t
    print(f"tuned {tuned} in {tune_s:.1f} s", flush=True)
    _, exact = ann.exact_knn(xb, test_q, 10)
    _, approx = index.search(test_q, 10)
    recall = ann.recall_at_k(approx, exact, 10)
    ex_b, ex_1 = qps(lambda q: ann.exact_knn(xb, q, 10), test_q, 50)
    ap_b, ap_1 = qps(lambda q: index.search(q, 10), test_q, 500)
    mem = faiss.serialize_index(index).nbytes
    body = (f"{args.n:,} x {args.d} float32 vectors (20,000 anisotropic clusters, normalised), budget "
            f"{args.max_memory / 1e9:.0f} GB and 10 ms. Chosen: `{factory}` ({why}); index size {mem / 1e6:.0f} MB; "
            f"build (train on a 100k sample + add) {build_s:.0f} s; tuning {tune_s:.0f} s -> {tuned['param']}="
            f"{tuned['value']}" + (f", re-ranking depth k_factor={tuned['k_factor']}" if "k_factor" in tuned else "") +
            f". Measured on 1,000 fresh queries (perturbed database vectors) against exact "
            f"inner-product search (faiss.knn), both with {faiss.omp_get_max_threads()} thread(s):\n\n"
            f"| search | recall@10 | QPS, batch of 1,000 | QPS, one at a time |\n|---|---|---|---|\n"
            f"| exact | 1.000 | {ex_b:,.0f} | {ex_1:,.0f} |\n| {factory} | {recall:.3f} | {ap_b:,.0f} | {ap_1:,.0f} |\n\n"
            f"**recall@10 {recall:.3f} at {ap_b / ex_b:.1f}x the exact QPS batched, {ap_1 / ex_1:.1f}x one query at a "
            f"time** (goal: >= 0.95 at >= 10x)\n")
    record("index-ann", "Index: 1M x 512 under a 2 GB budget vs exact search", body)


if __name__ == "__main__":
    main()
