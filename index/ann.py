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
import os
import time

import numpy as np

from ..core.errors import InputError, PsdclipError
from ..core.io import atomic_path
from . import parts as P

try:
    import faiss
except ImportError:  # faiss comes from an extra (pyproject.toml): say which
    raise PsdclipError("faiss is not installed: pip install 'psdclip[cpu]' (or 'psdclip[gpu]' on a CUDA machine, "
                       "not both: each installs the module faiss)") from None

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


def choose_factory(n: int, d: int, max_memory: float, max_query_ms: float, max_build_memory: float = math.inf
                   ) -> tuple[str, str]:
    """(faiss factory string, why) for n vectors of d dims under a memory budget (bytes) and a latency
    budget for one query (ms): the first candidate, in order of search quality and speed, that fits. Only IVF
    indices can be built in shards, so the others must also fit in the build's budget."""
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
            if need <= max_memory and ("IVF" in factory or need <= 0.75 * max_build_memory):
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


def search_param(factory: str) -> str | None:
    if factory.startswith("HNSW"):
        return "efSearch"
    if "IVF" in factory:
        return "nprobe"
    return None


GPU_MAX_K = 2048  # faiss-gpu's largest k (and nprobe) per search


def gpu_number(device: str) -> int:
    """The GPU of a device name: cuda:N -> N, cuda -> 0."""
    head, _, index = str(device).partition(":")
    return int(index) if head == "cuda" and index.isdigit() else 0


def to_gpu(index, device: str = "cuda:0"):
    """A copy of `index` on the searcher's own GPU (cuda:N; not one copy per GPU per worker) when faiss-gpu and
    CUDA are there; else the index unchanged, with the reason logged once: faiss-gpu has no HNSW and no fast-scan
    (PQ...x4fs) index, those stay on the CPU, memory-mapped."""
    import logging

    log = logging.getLogger(__name__)
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        log.info("faiss-gpu or a GPU is not there: the index is searched on the CPU")
        return index
    gpu = gpu_number(device)
    if gpu >= faiss.get_num_gpus():
        log.warning("%s: faiss sees %d GPU(s); the index stays on the CPU", device, faiss.get_num_gpus())
        return index
    try:
        resources = faiss.StandardGpuResources()
        moved = faiss.index_cpu_to_gpu(resources, gpu, index)
        moved.psdclip_resources = resources  # kept alive with the index
        return moved
    except (RuntimeError, AttributeError) as err:
        log.warning("the index cannot move to GPU %d (%s); it is searched on the CPU, memory-mapped", gpu,
                    str(err).strip().splitlines()[-1][:160] if str(err).strip() else type(err).__name__)
        return index


def on_gpu(index) -> bool:
    return "Gpu" in type(index).__name__


MAX_TRAIN_POINTS = 1_000_000  # bounds the training sample's memory (1M x 256 float32 = 1 GB)


def training_size(index, n: int, cap: int = MAX_TRAIN_POINTS) -> int:
    """Points to train on: ~100 per inverted list (faiss advises at least 39; k-means uses at most 256), at least
    10,000 (PQ codebooks of 256 centroids want ~39 x 256), never more than the collection or `cap`."""
    try:
        nlist = faiss.extract_index_ivf(index).nlist
    except RuntimeError:  # not an IVF index
        nlist = 0
    return int(min(n, cap, max(10_000, 100 * nlist)))


def _train(index, sample: np.ndarray):
    gpu = to_gpu(index)
    gpu.train(sample)
    return faiss.index_gpu_to_cpu(gpu) if gpu is not index else index


def build(xb: np.ndarray, factory: str, train_size: int | None = None, seed: int = 0):
    """An index of in-memory vectors (benchmarks, small collections); train_size: the training sample (default:
    training_size(), sized to the factory's nlist). `build_streamed` is the out-of-core build."""
    xb = check_vectors(xb)
    index = faiss.index_factory(xb.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    train_size = training_size(index, len(xb)) if train_size is None else train_size
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = xb[rng.choice(len(xb), min(len(xb), train_size), replace=False)] if len(xb) > train_size else xb
        index = _train(index, sample)
    index.add(xb)
    if isinstance(index, faiss.IndexRefine):
        index.k_factor = REFINE_K_FACTORS[0]  # saved with the index; tune() may raise it
    return index


def chunk_rows(max_build_memory: float, d: int) -> int:
    """Vectors read at a time by an out-of-core pass: an eighth of the build budget (1,024 to 262,144)."""
    return int(max(1024, min(262_144, max_build_memory / 8 / (4 * d))))


def shard_file(path: str, shard: int) -> str:
    """index.faiss -> index.00003.faiss: the file of one index shard."""
    root, ext = os.path.splitext(path)
    return f"{root}.{shard:05d}{ext}"


def build_streamed(parts, kind: str, factory: str, path: str, max_build_memory: float, *, seed: int = 0,
                   progress: bool = False) -> dict:
    """Train and fill an index from embedding parts without holding them: the training sample is sized to the
    factory's nlist and to a quarter of the build budget, vectors are added in chunks read from the parts,
    and when the filled index would not fit in the budget, IVF indices are built as several shards (each a
    range of row ids, all from one trained quantizer) written one after the other and searched together.
    Writes `path` (one shard) or shard_file(path, s); returns {"files": [...], "rows_per_shard": R}."""
    n, d = P.total(parts), P.vectors(parts[0], kind).shape[1]
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = "IVF" in factory
    if not index.is_trained:
        size = training_size(index, n, cap=int(min(MAX_TRAIN_POINTS, max(10_000, max_build_memory / 4 / (4 * d)))))
        index = _train(index, P.gather(parts, kind, P.sample_ids(n, size, seed)))
    if isinstance(index, faiss.IndexRefine):
        index.k_factor = REFINE_K_FACTORS[0]
    per_vector = index_bytes(factory, 1, d)
    chunk = chunk_rows(max_build_memory, d)
    fits = n * per_vector + chunk * 4 * d <= max_build_memory * 0.75
    if not fits and not ivf:
        raise InputError(f"--max-build-memory {max_build_memory / 1e6:.3g} MB: a {factory} index of {n:,} vectors "
                         f"(~{n * per_vector / 1e6:.3g} MB) does not fit in it and only IVF indices can be built in "
                         f"shards; raise the budget or give an IVF --factory")
    rows = n if fits else max(chunk, int((max_build_memory * 0.75 - chunk * 4 * d) / per_vector))
    trained = faiss.serialize_index(index) if rows < n else None
    files = []
    bar = None
    if progress:
        import sys

        from tqdm import tqdm

        bar = tqdm(total=n, desc=f"index {os.path.basename(path)}", unit="vec", file=sys.stderr)
    for s, start in enumerate(range(0, n, rows)):
        shard = index if trained is None else faiss.deserialize_index(trained)
        for _, x in P.chunks(parts, kind, chunk, start, min(n, start + rows)):
            shard.add(x)
            if bar:
                bar.update(len(x))
        out = path if trained is None else shard_file(path, s)
        with atomic_path(out) as tmp:
            faiss.write_index(shard, tmp)
        files.append(os.path.basename(out))
        del shard
    if bar:
        bar.close()
    return {"files": files, "rows_per_shard": int(rows)}


MMAP_FLAGS = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY


def open_index(directory: str, files: list[str], mmap: bool = True):
    """An index written by build_streamed, memory-mapped (the codes and inverted lists stay in the page cache,
    shared and evictable; read-only). Several shards are searched together (faiss.IndexShards, ids successive)."""
    flags = MMAP_FLAGS if mmap else 0
    subs = [faiss.read_index(os.path.join(directory, f), flags) for f in files]
    if len(subs) == 1:
        return subs[0]
    shards = faiss.IndexShards(subs[0].d, False, True)  # not threaded: faiss' OpenMP already uses the cores
    for sub in subs:
        shards.add_shard(sub)  # faiss' Python wrapper keeps a reference: the shards live as long as the whole
    return shards


class ShardFiles:
    """Index files searched one at a time, each memory-mapped for its search and closed after it (ids successive,
    results merged): a pass over them (the build's tuning) holds no more than one shard's touched pages."""

    def __init__(self, directory: str, files: list[str]):
        self.paths = [os.path.join(directory, f) for f in files]
        self.first = faiss.read_index(self.paths[0], MMAP_FLAGS)  # the type and nlist, for tuning
        self.params: dict[str, int] = {}
        self.k_factor = None

    def search(self, queries: np.ndarray, k: int):
        heap = faiss.ResultHeap(len(queries), k, keep_max=True)
        start = 0
        for path in self.paths:
            sub = faiss.read_index(path, MMAP_FLAGS)
            for name, value in self.params.items():
                faiss.ParameterSpace().set_index_parameter(sub, name, value)
            if self.k_factor is not None and isinstance(sub, faiss.IndexRefine):
                sub.k_factor = self.k_factor
            D, I = sub.search(queries, k)
            heap.add_result(D, np.where(I >= 0, I + start, -1))
            start += sub.ntotal
            del sub  # unmapped
        heap.finalize()
        return heap.D, heap.I


def sub_indices(index) -> list:
    if isinstance(index, ShardFiles):
        return [index.first]
    if isinstance(index, faiss.IndexShards):
        return [faiss.downcast_index(index.at(i)) for i in range(index.count())]
    return [index]


def set_param(index, name: str, value: int) -> None:
    if isinstance(index, ShardFiles):
        index.params[name] = value
        return
    for sub in sub_indices(index):
        faiss.ParameterSpace().set_index_parameter(sub, name, value)


def set_k_factor(index, value: float) -> None:
    if isinstance(index, ShardFiles):
        index.k_factor = float(value)
        return
    for sub in sub_indices(index):
        if isinstance(sub, faiss.IndexRefine):
            sub.k_factor = float(value)


def is_refine(index) -> bool:
    return isinstance(sub_indices(index)[0], faiss.IndexRefine)


def exact_knn_streamed(parts, kind: str, queries: np.ndarray, k: int, rows: int = 262_144
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k over the parts, a chunk at a time (memory: one chunk and the heaps)."""
    queries = check_vectors(queries)
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for start, x in P.chunks(parts, kind, rows):
        D, I = faiss.knn(queries, x, min(k, len(x)), metric=faiss.METRIC_INNER_PRODUCT)
        if D.shape[1] < k:
            D = np.pad(D, ((0, 0), (0, k - D.shape[1])), constant_values=-np.inf)
            I = np.pad(I, ((0, 0), (0, k - I.shape[1])), constant_values=-1)
        heap.add_result(D, np.where(I >= 0, I + start, -1))
    heap.finalize()
    return heap.D, heap.I


def drop_self(ids: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """The first k ids of each row other than the row's own id (self_ids[r] < 0: nothing to drop)."""
    out = np.empty((len(ids), k), dtype=ids.dtype)
    for r, (row, own) in enumerate(zip(ids, self_ids)):
        out[r] = (row[row != own] if own >= 0 else row)[:k]
    return out


def tune(index, factory: str, exact: np.ndarray, queries: np.ndarray, k: int, target: float,
         self_ids: np.ndarray | None = None, max_ms: float = math.inf) -> dict:
    """Raise nprobe / efSearch until recall@k >= target against the exact top-k ids, within the latency budget
    (max_ms per query), or until the search space ends; with a refine stage, try a few re-ranking depths (k_factor)
    at each nprobe before raising it, since re-ranking a few hundred candidates costs far less than scanning more
    lists. The k_factor is stored in the index. self_ids: for queries that are vectors of the collection, their own
    ids (else -1): a query finds itself almost for free, so recall is measured on the k neighbours after it (exact
    then holds the top k + 1).

    When the target is not reached within the budget, the setting with the best recall within it is returned with
    `missed`: what the budgets gave, and what the search gives past the latency budget (the sweep goes on past it,
    up to 20x the budget, so that the one line can say which budget to raise and what recall that buys)."""
    name = search_param(factory)
    if name is None:
        return {"param": None, "value": None, "recall": 1.0}
    if self_ids is not None:
        exact = drop_self(exact, self_ids, k)
    ivf_lists = faiss.extract_index_ivf(sub_indices(index)[0]).nlist if name == "nprobe" else None
    if name == "nprobe":  # doubling up to every list: the search space's end, not a fixed grid's
        values = [1 << i for i in range(0, 31) if (1 << i) < ivf_lists] + [ivf_lists]
    else:
        values = [max(v, k) for v in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)]
    refine = is_refine(index)
    factors = REFINE_K_FACTORS if refine else (None,)
    within = beyond = None
    for v in values:
        set_param(index, name, v)
        for kf in factors:
            if kf is not None:
                set_k_factor(index, kf)
            t = time.perf_counter()
            _, approx = index.search(queries, k if self_ids is None else k + 1)
            ms = 1000 * (time.perf_counter() - t) / len(queries)
            if self_ids is not None:
                approx = drop_self(approx, self_ids, k)
            rec = recall_at_k(approx, exact, k)
            here = {"param": name, "value": v, "recall": rec, "ms_per_query": ms,
                    **({"k_factor": kf} if kf is not None else {})}
            if ms <= max_ms:
                if rec >= target:
                    return here
                if within is None or rec > within["recall"]:
                    within = here
            elif beyond is None or rec > beyond["recall"] or beyond["recall"] < target <= rec:
                beyond = here
                if rec >= target:
                    break
        if (beyond is not None and (beyond["recall"] >= target or beyond["ms_per_query"] > 20 * max_ms)):
            break
    chosen = within or beyond  # (nothing within the latency budget: the best setting past it)
    set_param(index, name, chosen["value"])  # the index is left as tuned
    if "k_factor" in chosen:
        set_k_factor(index, chosen["k_factor"])
    return {**chosen, "missed": {"target": target, "max_ms": max_ms, "within_budget": within,
                                 "past_latency_budget": beyond}}


def budget_message(name: str, tuning: dict, factory: str, max_memory_flag: str) -> str:
    """The one line for a tuning that missed --target-recall: which budget to raise, and what recall that gives."""
    m = tuning["missed"]
    got = m["within_budget"]
    head = (f"{name}: recall@k {got['recall']:.3f} < --target-recall {m['target']:g} within --max-query-ms "
            f"{m['max_ms']:g} ({got['param']} {got['value']}, {got['ms_per_query']:.1f} ms)" if got else
            f"{name}: no {factory} setting answers within --max-query-ms {m['max_ms']:g}")
    past = m["past_latency_budget"]
    more = (f"; raising --max-query-ms to {math.ceil(past['ms_per_query'])} gives recall {past['recall']:.3f} "
            f"({past['param']} {past['value']})" if past else "")
    return (f"{head}{more}; or raise {max_memory_flag} for an index with finer codes than {factory} "
            f"(psdclip index build --factory FACTORY to choose one)")
