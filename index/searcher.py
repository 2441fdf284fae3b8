"""The query side of an index: a Python API used by `psdclip index query` and by the service.

    s = Searcher("INDEX")
    s.search(text="two red circles", k=10)            # text -> image
    s.search(image=PIL_IMAGE, k=10)                   # image -> image
    s.search(image=PIL_IMAGE, k=10, modality="text")  # image -> text (captions)
    s.search(embedding=np.array([...]), k=10)
"""
from __future__ import annotations

import json
import os
import threading

import faiss
import numpy as np
import pandas as pd
import torch

from psdclip.pipeline.errors import InputError

from . import ann
from .embed import read_image_bytes


class Searcher:
    def __init__(self, index_dir: str, device: str = "cpu", load_model: bool = True):
        meta_path = os.path.join(index_dir, "index.json")
        if not os.path.isfile(meta_path):
            raise InputError(f"{index_dir}: not a psdclip index (no index.json)")
        self.dir = index_dir
        self.device = torch.device(device)
        self.info = json.load(open(meta_path))
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
        self.key_to_id = dict(zip(self.meta["key"], self.meta["id"]))
        self.dim = int(self.info["dim"])
        self.model = None
        self._lock = threading.Lock()
        if load_model:
            self._load_model()

    def _load_model(self):
        from psdclip.train.evaluate import load_for_eval

        self.model, self.preprocess, self.tokenizer, _ = load_for_eval(self.info["checkpoint"], self.device)

    # ---- query embeddings ----
    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            return self.model.encode_text(self.tokenizer(texts).to(self.device), normalize=True).float().cpu().numpy()

    @torch.no_grad()
    def embed_image(self, image) -> np.ndarray:
        x = self.preprocess(image.convert("RGB")).unsqueeze(0).to(self.device)
        with self._lock:
            return self.model.encode_image(x, normalize=True).float().cpu().numpy()

    def query_vector(self, text=None, image=None, embedding=None) -> np.ndarray:
        given = [x is not None for x in (text, image, embedding)]
        if sum(given) != 1:
            raise ValueError("give exactly one of text, image or embedding")
        if text is not None:
            return self.embed_text([text])
        if image is not None:
            return self.embed_image(image)
        vec = ann.check_vectors(np.asarray(embedding, dtype=np.float32).reshape(1, -1), "embedding", self.dim)
        norm = np.linalg.norm(vec)
        if not np.isfinite(norm) or norm == 0:
            raise ValueError("embedding must be finite and non-zero")
        return vec / norm

    # ---- search ----
    def search(self, text=None, image=None, embedding=None, k: int = 10, modality: str = "image",
               dedupe: bool = False, dedupe_threshold: float = 0.98) -> list[dict]:
        if modality not in self.indices:
            raise ValueError(f"modality must be image or text, not {modality!r}")
        q = self.query_vector(text, image, embedding)
        index = self.indices[modality]
        fetch = min(index.ntotal, k * 3 if dedupe else k)
        scores, ids = index.search(q, fetch)
        scores, ids = scores[0], ids[0]
        keep = ids >= 0
        scores, ids = scores[keep], ids[keep]
        if dedupe and len(ids):
            vecs = np.vstack([index.reconstruct(int(i)) for i in ids]) if _can_reconstruct(index) else None
            if vecs is not None:
                vecs /= np.linalg.norm(vecs, axis=1, keepdims=True) + 1e-12
                chosen = []
                for j in range(len(ids)):
                    if all(float(vecs[j] @ vecs[c]) < dedupe_threshold for c in chosen):
                        chosen.append(j)
                scores, ids = scores[chosen], ids[chosen]
        rows = self.meta.iloc[ids[:k]]
        return [{"rank": r, "id": int(row.id), "key": row.key, "url": row.url, "caption": row.caption,
                 "score": float(s), "shard": int(row.shard), "offset": int(row.offset)}
                for r, (row, s) in enumerate(zip(rows.itertuples(), scores[:k]))]

    def image_bytes(self, key: str) -> bytes:
        if key not in self.key_to_id:
            raise KeyError(key)
        row = self.meta.iloc[self.key_to_id[key]]
        return read_image_bytes(self.info["dataset"], self.info.get("dataset_format", "webdataset"), int(row["shard"]),
                                int(row["offset"]), int(row["size"]))


def _can_reconstruct(index) -> bool:
    try:
        index.reconstruct(0)
        return True
    except RuntimeError:
        return False
