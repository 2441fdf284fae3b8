"""psdclip index build: embeddings + a FAISS index chosen under memory and latency budgets.

    INDEX/index.json        model checkpoint + hash, dim, metric, factory, build params, recall@k vs exact
    INDEX/index.faiss       image vectors (text->image and image->image queries)
    INDEX/captions.faiss    caption vectors (image->text queries)
    INDEX/embeddings/       img_*.npy, txt_*.npy, keys_*.npy per shard
    INDEX/metadata.parquet  row id -> key, url, caption, shard, offset, size
"""
from __future__ import annotations

import hashlib
import os
import time

import faiss
import numpy as np
import torch

from psdclip.pipeline.dataset import atomic_path, read_json, write_json, write_parquet
from psdclip.pipeline.errors import InputError

from . import ann
from .config import IndexBuildConfig, parse_bytes
from .embed import embed_dataset, load_embeddings, success_rows

def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_index(cfg: IndexBuildConfig) -> dict:
    from psdclip.train.checkpoint import load_model, resolve_device

    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise InputError(f"--out {cfg.out}: is a file, not an index directory")
    rows, _ = success_rows(cfg.data)
    m = load_model(cfg.checkpoint, resolve_device(cfg.device))
    with torch.no_grad():
        dim = int(m.model.encode_text(m.tokenizer(["x"]).to(m.device)).shape[-1])
    # budgets and --factory are checked before the (long) embedding pass, on the rows the dataset holds
    if cfg.factory:
        ann.check_factory(cfg.factory, len(rows), dim)
    else:
        ann.choose_factory(len(rows), dim, parse_bytes(cfg.max_memory), cfg.max_query_ms)
    digest = file_sha256(m.checkpoint)
    meta_path = os.path.join(cfg.out, "index.json")
    if os.path.isfile(meta_path):
        previous = read_json(meta_path)
        if previous.get("checkpoint_sha256") != digest:
            raise InputError(f"{cfg.out}: built with another checkpoint; use a new --out or delete it")
    os.makedirs(cfg.out, exist_ok=True)
    t0 = time.time()
    stats = embed_dataset(m, cfg.data, cfg.out, batch_size=cfg.batch_size, workers=cfg.workers, fp16=cfg.fp16,
                          progress=cfg.progress)
    t_embed = time.time() - t0
    img, txt, keys = load_embeddings(cfg.out)
    meta = rows.set_index("key").loc[keys].reset_index()[["key", "url", "caption", "shard", "offset", "size"]]
    meta.insert(0, "id", np.arange(len(meta)))
    n, d = img.shape
    factory, why = (cfg.factory, "given with --factory") if cfg.factory else \
        ann.choose_factory(n, d, parse_bytes(cfg.max_memory), cfg.max_query_ms)
    t1 = time.time()
    rng = np.random.default_rng(0)
    held = rng.choice(n, min(n, 500), replace=False)
    # held-out queries: captions (text->image, the main use) and images
    queries = np.concatenate([txt[held[: len(held) // 2]], img[held[len(held) // 2:]]])
    indices = {}
    for name, vectors in (("index.faiss", img), ("captions.faiss", txt)):
        try:
            index = ann.build(vectors, factory)
        except RuntimeError as err:  # e.g. PQ codes that need more training points than the dataset has
            msg = str(err).strip().splitlines()[-1].split(": ", 1)[-1][:160]
            raise InputError(f"--factory {factory!r}: faiss could not train it on {n:,} vectors ({msg})") from None
        tuning = ann.tune(index, factory, vectors, queries, min(cfg.k, n), cfg.target_recall)
        with atomic_path(os.path.join(cfg.out, name)) as tmp:
            faiss.write_index(index, tmp)
        indices[name] = tuning
    t_index = time.time() - t1
    write_parquet(os.path.join(cfg.out, "metadata.parquet"), meta)
    doc = {"schema_version": 1, "checkpoint": os.path.abspath(m.checkpoint), "checkpoint_sha256": digest,
           "model_arch": m.arch, "step": m.step, "dataset": os.path.abspath(cfg.data),
           "dataset_format": read_json(os.path.join(cfg.data, "dataset.json")).get("output_format", "webdataset"),
           "count": int(n), "dim": int(d), "metric": "inner_product (cosine on normalised vectors)",
           "factory": factory, "why": why, "budgets": {"max_memory": cfg.max_memory, "max_query_ms": cfg.max_query_ms},
           "search_params": {k: {"param": v["param"], "value": v["value"],
                                     **({"k_factor": v["k_factor"]} if "k_factor" in v else {})}
                                 for k, v in indices.items()},
           "recall_at_k": {k: {"k": min(cfg.k, n), "recall": v["recall"], "ms_per_query": v.get("ms_per_query")}
                           for k, v in indices.items()},
           "embeddings_dtype": "float16" if cfg.fp16 else "float32", "embed_s": round(t_embed, 2),
           "index_build_s": round(t_index, 2), "undecodable_images": stats["undecodable"]}
    write_json(meta_path, doc)
    return doc


def cmd_index_build(cfg: IndexBuildConfig) -> int:
    doc = build_index(cfg)
    r = doc["recall_at_k"]["index.faiss"]
    print(f"indexed {doc['count']:,} images x {doc['dim']} dims with {doc['factory']} ({doc['why']}); "
          f"recall@{r['k']} vs exact {r['recall']:.3f}; index in {os.path.abspath(cfg.out)}")
    return 0
