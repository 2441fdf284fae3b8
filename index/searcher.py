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
from collections import OrderedDict

import faiss
import numpy as np
import pandas as pd
import torch

from psdclip.pipeline.dataset import read_json
from psdclip.pipeline.errors import InputError
from psdclip.train.models import encode_text

from . import ann
from .embed import read_image_bytes


class Searcher:
    def __init__(self, index_dir: str, device: str = "cpu", load_model: bool = True, text_cache: int = 0):
        meta_path = os.path.join(index_dir, "index.json")
        if not os.path.isfile(meta_path):
            raise InputError(f"{index_dir}: not a psdclip index (no index.json)")
        self.dir = index_dir
        self.device = torch.device(device)
        # an LRU cache of query-text embeddings (web search repeats its queries); 0 turns it off
        self.text_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.text_cache_size = text_cache
        self.cache_hits = self.cache_misses = 0
        self.info = read_json(meta_path)
        self.indices = {}
        for name, modality in (("index.faiss", "image"), ("captions.faiss", "text")):
            index = faiss.read_index(os.path.join(index_dir, name))
            p = self.info["search_params"][name]
            if p["param"]:
                ann.set_param(index, p["param"], int(p["value"]))
            if p.get("k_factor"):
                index.k_factor = float(p["k_factor"])
            if self.device.type == "cuda":
                index = ann.to_gpu(index)  # faiss-gpu, when installed; unchanged otherwise
            self.indices[modality] = index
        self.meta = pd.read_parquet(os.path.join(index_dir, "metadata.parquet"))
        # plain column lists: building a result row is a few list lookups, not a pandas row
        self.columns = {c: self.meta[c].tolist() for c in ("id", "key", "url", "caption", "shard", "offset", "size")}
        self.key_to_id = dict(zip(self.columns["key"], self.columns["id"]))
        self.dim = int(self.info["dim"])
        self.model = None
        self._lock = threading.Lock()
        if load_model:
            self._load_model()

    def _load_model(self):
        from psdclip.train.checkpoint import load_model

        m = load_model(self.info["checkpoint"], self.device)
        self.model, self.preprocess, self.tokenizer = m.model, m.preprocess, m.tokenizer

    # ---- query embeddings ----
    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> np.ndarray:
        """The texts' embeddings; those in the LRU cache are not encoded again (the rest in one forward pass)."""
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
                fresh = encode_text(self.model, self.tokenizer(todo).to(self.device)).float().cpu().numpy()
                found.update(zip(todo, fresh))
                if self.text_cache_size:
                    for t, v in zip(todo, fresh):
                        cache[t] = v
                    while len(cache) > self.text_cache_size:
                        cache.popitem(last=False)
            return np.stack([found[t] for t in texts])

    @torch.no_grad()
    def embed_images(self, images: list) -> np.ndarray:
        x = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        with self._lock:
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
        if modality not in self.indices:
            raise ValueError(f"modality must be image or text, not {modality!r}")
        dedupe = dedupe or [False] * len(ks)
        index = self.indices[modality]
        fetch = min(index.ntotal, max(k * 3 if d else k for k, d in zip(ks, dedupe)))
        all_scores, all_ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), fetch)
        out = []
        for scores, ids, k, d in zip(all_scores, all_ids, ks, dedupe):
            keep = ids >= 0
            scores, ids = scores[keep], ids[keep]
            if d and len(ids):
                scores, ids = self._dedupe(index, scores, ids, dedupe_threshold, k)
            out.append(self.rows(ids[:k], scores[:k]))
        return out

    @staticmethod
    def _dedupe(index, scores, ids, threshold, k=None):
        """Greedy in rank order: a result is kept unless it is within `threshold` (cosine) of one already kept.
        One similarity matrix and one row operation per kept result (k = 1000 takes milliseconds)."""
        if not _can_reconstruct(index):
            return scores, ids
        try:
            vecs = index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))
        except RuntimeError:  # index types without a batch reconstruct
            vecs = np.vstack([index.reconstruct(int(i)) for i in ids])
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

    def rows(self, ids, scores) -> list[dict]:
        c = self.columns
        return [{"rank": r, "id": c["id"][i], "key": c["key"][i], "url": c["url"][i], "caption": c["caption"][i],
                 "score": float(s), "shard": c["shard"][i], "offset": c["offset"][i]}
                for r, (i, s) in enumerate(zip(ids.tolist(), scores))]

    def image_bytes(self, key: str) -> bytes:
        if key not in self.key_to_id:
            raise KeyError(key)
        i, c = self.key_to_id[key], self.columns
        return read_image_bytes(self.info["dataset"], self.info.get("dataset_format", "webdataset"), int(c["shard"][i]),
                                int(c["offset"][i]), int(c["size"][i]))


def _can_reconstruct(index) -> bool:
    try:
        index.reconstruct(0)
        return True
    except RuntimeError:
        return False
