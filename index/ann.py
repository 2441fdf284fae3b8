"""FAISS index selection, training, tuning and recall measurement. numpy in, numpy out, shapes checked.

Selection follows autofaiss's rules of thumb (reimplemented here; autofaiss itself pins old
dependencies): exact search while it fits the latency budget; HNSW when the vectors fit in memory with
the graph and the collection is moderate; then IVF (nlist ~ 4·sqrt(n)) whose lists hold 4-bit fast-scan PQ
codes (SIMD look-up tables: scanning is several times faster than flat or SQ8 codes), re-ranked by a refine
stage over exact vectors or, when those do not fit, 8-bit SQ codes; (OPQ+)PQ alone when memory is tightest.
The index is trained on a sample sized to its number of inverted lists (bounded), its search parameter (nprobe or efSearch) is raised until recall@k against exact search reaches the target on held-out queries, and that recall is stored.
"""
from __future__ import annotations

import math
import time

import faiss
import numpy as np

from psdclip.pipeline.errors import InputError

EXACT_VECTORS_PER_S = 4e9  # dimensions scanned per second by exact CPU search, a conservative figure


def check_vectors(x: np.ndarray, name: str = "vectors", dim: int | None = None) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-d array, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name}: expected {dim} dimensions, got {x.shape[1]}")
    return x


def index_bytes(factory: str, n: int, d: int) -> float:
    """Memory of an index of n d-dim vectors: faiss' own code size per vector for the factory string
    (contrib.factory_tools.get_code_size: codes, refine vectors, graph links), 8-byte ids in inverted lists, and
    10% for the rest (quantizer, list headers)."""
    from faiss.contrib.factory_tools import get_code_size

    return n * (get_code_size(d, factory) + (8 if "IVF" in factory else 0)) * 1.1


def choose_factory(n: int, d: int, max_memory: float, max_query_ms: float) -> tuple[str, str]:
    """(faiss factory string, why) for n vectors of d dims under a memory budget (bytes) and a latency
    budget for one query (ms): the first candidate, in order of search quality and speed, that fits."""
    exact_ms = 1000 * n * d / EXACT_VECTORS_PER_S
    nlist = int(2 ** round(math.log2(max(64, min(65536, 4 * math.sqrt(n))))))
    fs = fast_scan_m(d)
    candidates = [("Flat", exact_ms <= max_query_ms or n <= 20_000, f"exact search fits, ~{exact_ms:.1f} ms per query"),
                  ("HNSW32,Flat", n <= 2_000_000 and d <= 256, "vectors and graph fit; HNSW for low latency"),
                  (f"IVF{nlist},PQ{fs}x4fs,RFlat", fs is not None, f"flat vectors fit: IVF with {nlist} lists of "
                   f"{fs}x4-bit fast-scan PQ codes, re-ranked exactly"),
                  (f"IVF{nlist},PQ{fs}x4fs,Refine(SQ8)", fs is not None, f"8-bit scalar codes fit: IVF with {nlist} "
                   f"lists of {fs}x4-bit fast-scan PQ codes, re-ranked on the SQ8 codes"),
                  (f"IVF{nlist},SQ8", True, f"8-bit scalar codes fit; IVF with {nlist} lists")]
    candidates += [(f"OPQ{m},IVF{nlist},PQ{m}", d % m == 0, f"{m}-byte PQ codes with OPQ fit")
                   for m in (64, 48, 32, 24, 16, 8, 4)]
    for factory, allowed, why in candidates:
        if allowed:
            need = index_bytes(factory, n, d)
            if need <= max_memory:
                return factory, f"{why} ({need / 1e6:.0f} MB)"
    smallest = index_bytes(f"OPQ4,IVF{nlist},PQ4", n, d)
    raise InputError(f"--max-memory {max_memory / 1e6:.3g} MB: no index of {n:,} x {d} vectors fits in it (the "
                     f"smallest, 4-byte PQ codes, needs ~{smallest / 1e6:.3g} MB)")


def check_factory(factory: str, n: int, d: int) -> None:
    """A one-line error, before any work, for a factory string faiss cannot parse or cannot train on n vectors."""
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        msg = str(err).strip().splitlines()[-1].split(": ", 1)[-1][:120]
        raise InputError(f"--factory {factory!r}: not a faiss index for {d}-dim vectors ({msg})") from None
    try:
        nlist = faiss.extract_index_ivf(index).nlist
    except RuntimeError:  # not an IVF index
        nlist = 0
    if nlist > n:
        raise InputError(f"--factory {factory!r}: {nlist:,} inverted lists need at least as many vectors to train; "
                         f"the dataset has {n:,} (faiss advises ~39 per list: at most IVF{max(1, n // 39)} here)")


def fast_scan_m(d: int) -> int | None:
    """Sub-quantizers for 4-bit fast-scan PQ: one per 4 dimensions (an even count), None when d does not allow."""
    m = d // 4
    return m if d % 4 == 0 and m % 2 == 0 and m >= 8 else None


REFINE_K_FACTORS = (16, 64, 256)  # a refine stage re-ranks k x k_factor candidates: cheap next to a list scan


def exact_knn(xb: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Inner-product k nearest neighbours by brute force (faiss IndexFlatIP): the reference."""
    return faiss.knn(check_vectors(xq, "queries", xb.shape[1]), check_vectors(xb), k, metric=faiss.METRIC_INNER_PRODUCT)


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Fraction of the exact top-k found in the approximate top-k."""
    hits = sum(len(set(a[:k]) & set(e[:k]) - {-1}) for a, e in zip(approx, exact))
    return hits / (len(exact) * k)


def set_param(index, name: str, value: int) -> None:
    faiss.ParameterSpace().set_index_parameter(index, name, value)


def search_param(factory: str) -> str | None:
    if factory.startswith("HNSW"):
        return "efSearch"
    if "IVF" in factory:
        return "nprobe"
    return None


def to_gpu(index):
    """Move an index to every GPU when faiss-gpu and CUDA are there; else return it unchanged."""
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        try:
            return faiss.index_cpu_to_all_gpus(index)
        except RuntimeError:
            return index
    return index


MAX_TRAIN_POINTS = 1_000_000  # bounds the training sample's memory (1M x 256 float32 = 1 GB)


def training_size(index, n: int, cap: int = MAX_TRAIN_POINTS) -> int:
    """Points to train on: ~100 per inverted list (faiss advises at least 39; k-means uses at most 256), at least
    10,000 (PQ codebooks of 256 centroids want ~39 x 256), never more than the collection or `cap`."""
    try:
        nlist = faiss.extract_index_ivf(index).nlist
    except RuntimeError:  # not an IVF index
        nlist = 0
    return int(min(n, cap, max(10_000, 100 * nlist)))


def build(xb: np.ndarray, factory: str, train_size: int | None = None, seed: int = 0):
    """train_size: the training sample (default: training_size(), sized to the factory's nlist)."""
    xb = check_vectors(xb)
    index = faiss.index_factory(xb.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    train_size = training_size(index, len(xb)) if train_size is None else train_size
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = xb[rng.choice(len(xb), min(len(xb), train_size), replace=False)] if len(xb) > train_size else xb
        gpu = to_gpu(index)
        gpu.train(sample)
        index = faiss.index_gpu_to_cpu(gpu) if gpu is not index else index
    index.add(xb)
    if isinstance(index, faiss.IndexRefine):
        index.k_factor = REFINE_K_FACTORS[0]  # saved with the index; tune() may raise it
    if "IVF" in factory:
        faiss.extract_index_ivf(index).make_direct_map()  # reconstruct() for de-duplicating results
    return index


def tune(index, factory: str, xb: np.ndarray, queries: np.ndarray, k: int, target: float) -> dict:
    """Raise nprobe / efSearch until recall@k >= target against exact search (or the search space ends); with a
    refine stage, try a few re-ranking depths (k_factor) at each nprobe before raising it, since re-ranking a
    few hundred candidates costs far less than scanning more lists. The k_factor is stored in the index."""
    _, exact = exact_knn(xb, queries, k)
    name = search_param(factory)
    if name is None:
        return {"param": None, "value": None, "recall": 1.0}
    ivf_lists = faiss.extract_index_ivf(index).nlist if name == "nprobe" else None
    values = [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if ivf_lists is None or v <= ivf_lists]
    if name == "efSearch":
        values = [max(v, k) for v in (16, 32, 64, 128, 256, 512, 1024)]
    refine = isinstance(index, faiss.IndexRefine)
    factors = REFINE_K_FACTORS if refine else (None,)
    best = None
    for v in values:
        set_param(index, name, v)
        for kf in factors:
            if kf is not None:
                index.k_factor = kf
            t = time.perf_counter()
            _, approx = index.search(queries, k)
            ms = 1000 * (time.perf_counter() - t) / len(queries)
            rec = recall_at_k(approx, exact, k)
            best = {"param": name, "value": v, "recall": rec, "ms_per_query": ms,
                    **({"k_factor": kf} if kf is not None else {})}
            if rec >= target:
                return best
    return best
