"""The query side of an index: a Python API used by `psdclip index query` and by the service.

    s = Searcher("INDEX")
    s.search(text="two red circles", k=10)            # text -> image
    s.search(image=PIL_IMAGE, k=10)                   # image -> image
    s.search(image=PIL_IMAGE, k=10, modality="text")  # image -> text (captions)
    s.search(embedding=np.array([...]), k=10)
"""
from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict

import numpy as np

from ..core import storage
from ..core.errors import InputError
from ..pipeline.format import DatasetLayout, dataset_id, read_info, shard_name
from ..pipeline.reader import read_image_bytes
from . import ann
from . import parts as P
from .config import TEXT_RUNTIMES
from .format import IndexInfo


class Searcher:
    """model: a LoadedModel to reuse (a reload of an index built with the same checkpoint shares it).
    text_runtime: "eager" (plain PyTorch) or "torchscript" (the text tower as traces that release the GIL, for a
    service answering many small batches; see train.models.TracedText)."""

    def __init__(self, index_dir: str, device: str = "cpu", load_model: bool = True, text_cache: int = 0,
                 model=None, text_runtime: str = "eager"):
        if text_runtime not in TEXT_RUNTIMES:
            raise ValueError(f"text_runtime must be eager or torchscript, not {text_runtime!r}")
        self.text_runtime = text_runtime
        self.info = IndexInfo.read(index_dir)
        self.dir = index_dir
        self.device = _Device(device)  # torch is imported only when a model is loaded
        # an LRU cache of query-text embeddings (web search repeats its queries); 0 turns it off
        self.text_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.text_cache_size = text_cache
        self.cache_hits = self.cache_misses = 0
        files = self.info.files
        self.indices = {}
        for name, modality in (("index.faiss", "image"), ("captions.faiss", "text")):
            if name not in files:
                continue
            # memory-mapped: the index costs page cache (shared, evictable), not the process' own memory
            # memory-mapped (also before a GPU copy: a failed copy then leaves the mapped index, not a private one)
            index = ann.open_index(index_dir, files[name], mmap=True)
            p = self.info.search_params[name]
            if p["param"]:
                ann.set_param(index, p["param"], int(p["value"]))
            if p.get("k_factor"):
                ann.set_k_factor(index, float(p["k_factor"]))
            if self.device.type == "cuda":
                index = ann.to_gpu(index, self.device.name)  # faiss-gpu, when installed; unchanged otherwise
            self.indices[modality] = index
        self.meta, self.key_order = _read_metadata(index_dir)
        self.count = self.meta.num_rows
        for modality, index in self.indices.items():  # a damaged or half-replaced index answers nothing, not 500s
            if index.ntotal != self.count or self.count != self.info.count:
                raise InputError(f"{index_dir}: an inconsistent index ({modality} vectors {index.ntotal:,}, "
                                 f"metadata rows {self.count:,}, index.json {self.info.count:,}): rebuild it")
        # the dataset's additional input columns (--save-additional-columns), answered with every hit
        self.extra = [c for c in self.meta.column_names
                      if c not in ("id", "key", "url", "caption", "shard", "offset", "size")]
        # the table's record batches and where each starts: rows are taken batch by batch (Arrow's take on the
        # whole chunked table concatenates every chunk first: ~1 s per call at 10M rows)
        self.batches = self.meta.to_batches()
        self.batch_starts = np.cumsum([0] + [b.num_rows for b in self.batches])
        self._dataset_stamp, self._dataset_now = (), None  # check_dataset's cache
        self._parts = False  # the embedding parts, listed at the first de-duplicated query (a header read per part)
        self.dim = int(self.info.dim)
        self.model = self.loaded = None
        self._lock = threading.Lock()
        if model is not None:
            self._use(model)
        elif load_model and self.info.checkpoint:
            self._load_model()

    @property
    def parts(self):
        """The index's embedding parts (None when it has none), listed once, when first asked for."""
        if self._parts is False:
            emb, parts = self.info.embeddings, None
            if emb and os.path.isdir(emb):
                try:
                    parts = P.list_parts(emb)[0]
                except InputError:
                    parts = None
            self._parts = parts
        return self._parts

    def _load_model(self):
        from ..train.loading import load_model  # lazy: torch, only with a model

        self._use(load_model(self.info.check_checkpoint(self.dir), self.device.name))

    def _use(self, m):
        self.loaded = m
        self.model, self.preprocess, self.tokenizer = m.model, m.preprocess, m.tokenizer
        if self.text_runtime == "torchscript":
            from ..train.models import TracedText  # lazy: torch, only with a model

            # kept with the loaded model: a reload that shares the model shares its traces
            if "traced_text" not in m.__dict__:
                m.traced_text = TracedText(m.model)
                m.traced_text.warm(self.tokenizer, self.device.name)
            self.encode_text = m.traced_text
        else:
            from ..train.models import encode_text  # lazy: torch, only with a model

            self.encode_text = lambda tokens: encode_text(self.model, tokens)

    def _need_model(self, what: str):
        if self.model is None:
            raise ValueError(f"{what} queries need a model: this index was built from embeddings without a "
                             f"checkpoint (embedding queries only)")

    # ---- query embeddings ----
    def embed_text(self, texts: list[str]) -> np.ndarray:
        """The texts' embeddings; those in the LRU cache are not encoded again (the rest in one forward pass)."""
        self._need_model("text")
        with self._lock:
            cache, found = self.text_cache, {}
            if self.text_cache_size:
                for t in texts:
                    if t in cache:
                        cache.move_to_end(t)
                        found[t] = cache[t]
            missing = [t for t in texts if t not in found]
            self.cache_hits += len(texts) - len(missing)
            self.cache_misses += len(missing)
            todo = list(dict.fromkeys(missing))
            if todo:
                import torch

                with torch.no_grad():
                    fresh = self.encode_text(self.tokenizer(todo).to(self.device.name)).float().cpu().numpy()
                found.update(zip(todo, fresh))
                if self.text_cache_size:
                    for t, v in zip(todo, fresh):
                        cache[t] = v
                    while len(cache) > self.text_cache_size:
                        cache.popitem(last=False)
            return np.stack([found[t] for t in texts])

    def embed_images(self, images: list) -> np.ndarray:
        self._need_model("image")
        import torch

        x = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device.name)
        with self._lock, torch.no_grad():
            return self.model.encode_image(x, normalize=True).float().cpu().numpy()

    def embed_image(self, image) -> np.ndarray:
        return self.embed_images([image])

    def check_embedding(self, embedding) -> np.ndarray:
        vec = ann.check_vectors(np.asarray(embedding, dtype=np.float32).reshape(1, -1), "embedding", self.dim)
        norm = np.linalg.norm(vec)
        if not np.isfinite(norm) or norm == 0:
            raise ValueError("embedding must be finite and non-zero")
        return vec / norm

    def query_vector(self, text=None, image=None, embedding=None) -> np.ndarray:
        given = [x is not None for x in (text, image, embedding)]
        if sum(given) != 1:
            raise ValueError("give exactly one of text, image or embedding")
        if text is not None:
            return self.embed_text([text])
        if image is not None:
            return self.embed_image(image)
        return self.check_embedding(embedding)

    # ---- search ----
    def search(self, text=None, image=None, embedding=None, k: int = 10, modality: str = "image",
               dedupe: bool = False, dedupe_threshold: float = 0.98) -> list[dict]:
        q = self.query_vector(text, image, embedding)
        return self.search_vectors(q, [k], modality, [dedupe], dedupe_threshold)[0]

    def search_vectors(self, queries: np.ndarray, ks: list[int], modality: str = "image", dedupe: list | None = None,
                       dedupe_threshold: float = 0.98) -> list[list[dict]]:
        """Several query vectors in one index call (the service batches concurrent requests this way); each
        query has its own k and de-duplication flag."""
        if modality not in ("image", "text"):
            raise ValueError(f"modality must be image or text, not {modality!r}")
        if modality not in self.indices:
            raise ValueError("this index has no caption vectors (built from embeddings without text_emb/)")
        dedupe = dedupe or [False] * len(ks)
        index = self.indices[modality]
        fetch = min(index.ntotal, max(k * 3 if d else k for k, d in zip(ks, dedupe)))
        if ann.on_gpu(index):  # faiss-gpu answers k <= 2048: de-duplication then looks at fewer candidates
            fetch = min(fetch, ann.GPU_MAX_K)
        all_scores, all_ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), fetch)
        hits = []
        for scores, ids, k, d in zip(all_scores, all_ids, ks, dedupe):
            keep = ids >= 0
            scores, ids = scores[keep], ids[keep]
            if d and len(ids):
                scores, ids = self._dedupe(self.vectors_of(modality), scores, ids, dedupe_threshold, k)
            hits.append((ids[:k], scores[:k]))
        # the metadata of every query's hits in one lookup (one take per record batch for the whole batch of
        # queries, not per query: each Arrow call costs tens of microseconds)
        cols = self.take(np.concatenate([ids for ids, _ in hits]) if hits else [])
        out, start = [], 0
        for ids, scores in hits:
            out.append([{"rank": r, "id": cols["id"][start + r], "key": cols["key"][start + r],
                         "url": cols["url"][start + r], "caption": cols["caption"][start + r], "score": float(sc),
                         "shard": cols["shard"][start + r], "offset": cols["offset"][start + r],
                         **{c: cols[c][start + r] for c in self.extra}}
                        for r, sc in enumerate(scores)])
            start += len(ids)
        return out

    def vectors_of(self, modality: str):
        """ids -> the stored vectors: read from the embedding parts when they are there, else reconstructed by
        the index (None when it cannot)."""
        parts = self.parts
        if parts is not None:
            return lambda ids: P.gather(parts, modality, ids)
        index = self.indices[modality]
        if not _can_reconstruct(index):
            return None
        return lambda ids: _reconstruct(index, ids)

    @staticmethod
    def _dedupe(vectors_of, scores, ids, threshold, k=None):
        """Greedy in rank order: a result is kept unless it is within `threshold` (cosine) of one already kept.
        One similarity matrix and one row operation per kept result (k = 1000 takes milliseconds).
        vectors_of: ids -> vectors (or a faiss index that can reconstruct them; None: no de-duplication)."""
        if vectors_of is None:
            return scores, ids
        if not callable(vectors_of):
            index = vectors_of
            vectors_of = lambda ids_: _reconstruct(index, ids_)  # noqa: E731
        vecs = vectors_of(ids)
        vecs = vecs / (np.linalg.norm(vecs, axis=1, keepdims=True) + 1e-12)
        close = (vecs @ vecs.T) >= threshold
        suppressed = np.zeros(len(ids), dtype=bool)
        chosen = []
        for j in range(len(ids)):
            if suppressed[j]:
                continue
            chosen.append(j)
            if k is not None and len(chosen) == k:
                break
            suppressed |= close[j]
        return scores[chosen], ids[chosen]

    def metadata(self, ids: list[int]) -> list[dict]:
        """clip-retrieval's /metadata: url, caption and key of each valid id."""
        valid = [i for i in ids if 0 <= i < self.count]
        cols = self.take(valid)
        return [{"id": i, "metadata": {"url": cols["url"][j], "caption": cols["caption"][j], "key": cols["key"][j]}}
                for j, i in enumerate(valid)]

    def take(self, ids) -> dict[str, list]:
        """The metadata rows of the given ids, in their order, as column lists: one take per record batch."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return {c: [] for c in self.meta.column_names}
        which = np.searchsorted(self.batch_starts, ids, side="right") - 1
        out = {c: [None] * len(ids) for c in self.meta.column_names}
        for b in np.unique(which):
            at = np.nonzero(which == b)[0]
            part = self.batches[b].take(ids[at] - self.batch_starts[b]).to_pydict()
            for c, values in part.items():
                col = out[c]
                for j, v in zip(at.tolist(), values):
                    col[j] = v
        return out

    def id_of(self, key: str) -> int:
        """The row id of a key: a binary search through the ids in key order (memory-mapped, no key -> id dict)."""
        keys, order = self.meta.column("key"), self.key_order
        lo, hi = 0, len(order)
        while lo < hi:
            mid = (lo + hi) // 2
            if keys[order[mid].as_py()].as_py() < key:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(order) and keys[order[lo].as_py()].as_py() == key:
            return int(order[lo].as_py())
        raise KeyError(key)

    def image_bytes(self, key: str) -> bytes:
        """The stored image of `key`, read from its shard by the offset the index recorded, once the dataset is
        checked to be the one indexed (DatasetChanged otherwise: offsets into a rebuilt dataset point anywhere)."""
        if not self.info.dataset:
            raise KeyError(key)  # built from embeddings alone: the images are elsewhere
        self.check_dataset()
        row = self.take([self.id_of(key)])
        fmt, shard = self.info.dataset_format or "webdataset", int(row["shard"][0])
        self.check_shard(shard, fmt)
        return read_image_bytes(self.info.dataset, fmt, shard, int(row["offset"][0]), int(row["size"][0]))

    def check_shard(self, shard: int, fmt: str) -> None:
        """The shard's size and mtime now against those recorded at build (a local dataset's; an index built before
        they were recorded, or on an object store, has none)."""
        recorded = (self.info.dataset_shards or {}).get(shard_name(shard, fmt))
        if recorded is None:
            return
        path = DatasetLayout(self.info.dataset).shard_path(shard, fmt)
        try:
            st = os.stat(path)
            now = [st.st_size, st.st_mtime_ns]
        except OSError:
            now = None
        if now != list(recorded):
            raise DatasetChanged(f"{path}: {'gone' if now is None else 'replaced'} since this index was built (its "
                                 f"size and time were recorded then); rebuild the index")

    def check_dataset(self) -> None:
        """The dataset's id now against the one index.json recorded (read again when dataset.json changes)."""
        if not self.info.dataset_id:  # an index built before ids were recorded
            return
        path = DatasetLayout(self.info.dataset).dataset_json
        if storage.is_remote(path):  # an object store: asked again at most every 5 s
            stamp = int(time.monotonic() // 5)
        else:
            try:
                st = os.stat(path)
                stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            except OSError:
                stamp = None
        if stamp != self._dataset_stamp:
            try:
                self._dataset_now = dataset_id(read_info(self.info.dataset))
            except InputError:
                self._dataset_now = None
            self._dataset_stamp = stamp
        if self._dataset_now != self.info.dataset_id:
            raise DatasetChanged(f"{self.info.dataset}: not the dataset this index was built from (dataset id "
                                 f"{self.info.dataset_id}, now {self._dataset_now or 'none'}: rebuilt or removed "
                                 f"since); rebuild the index ({path})")


class DatasetChanged(InputError):
    """The dataset an index names was rebuilt (or removed) since the index was built."""


class _Device:
    """A device name and its type (torch.device's two fields used here, without importing torch)."""

    def __init__(self, name: str):
        self.name = str(name)
        self.type = self.name.split(":")[0]


def _read_metadata(index_dir: str):
    """(metadata table, ids in key order): metadata.arrow memory-mapped (zero-copy), or an older index's
    metadata.parquet read whole."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = os.path.join(index_dir, "metadata.arrow")
    if os.path.isfile(path):
        table = pa.ipc.open_file(pa.memory_map(path)).read_all()
        order = pa.ipc.open_file(pa.memory_map(os.path.join(index_dir, "key_order.arrow"))).read_all().column("id")
    else:
        table = pq.read_table(os.path.join(index_dir, "metadata.parquet"))
        order = pc.sort_indices(table.column("key"))
    return table, order


def _reconstruct(index, ids) -> np.ndarray:
    try:
        return index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))
    except RuntimeError:  # index types without a batch reconstruct
        return np.vstack([index.reconstruct(int(i)) for i in ids])


def _can_reconstruct(index) -> bool:
    try:
        index.reconstruct(0)
        return True
    except RuntimeError:
        return False

