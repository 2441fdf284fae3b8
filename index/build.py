"""psdclip index build: embeddings + a FAISS index chosen under memory and latency budgets, built out of core.

    INDEX/index.json          model checkpoint + hash (or none), dim, metric, factory, files, build params,
                              recall@k vs exact
    INDEX/index.faiss         image vectors (text->image and image->image queries); or index.NNNNN.faiss shards
    INDEX/captions.faiss      caption vectors (image->text queries), when captions were embedded
    INDEX/embeddings/         per-shard parts in clip-retrieval's layout (img_emb/, text_emb/, metadata/), unless
                              the index was built from --embeddings DIR (index.json names that folder)
    INDEX/metadata.arrow      row id -> key, url, caption, shard, offset, size (Arrow IPC, read memory-mapped)
    INDEX/key_order.arrow     row ids in key order (the image endpoint's key -> id lookup, a binary search)

Memory: vectors are read from the parts in chunks (plain reads); the training sample, one chunk and the index being
filled are what the build holds, and `--max-build-memory` bounds them (IVF indices over the budget are built as
several shards searched together).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time

import numpy as np

from ..core import storage
from ..core.errors import InputError, PsdclipError
from ..core.locks import writer_lock
from ..core.io import atomic_path, sha256_file
from ..pipeline.format import DatasetLayout, dataset_id, read_info, shard_format
from ..pipeline.reader import success_rows
from . import ann
from . import parts as P
from .config import IndexBuildConfig, parse_bytes
from .format import INFO, IndexInfo

log = logging.getLogger(__name__)

STANDARD_COLUMNS = ("key", "url", "caption", "shard", "offset", "size")


def _model_dim(m) -> int:
    import torch

    with torch.no_grad():
        return int(m.model.encode_text(m.tokenizer(["x"]).to(m.device)).shape[-1])


def write_metadata(parts: list[P.Part], out: str) -> None:
    """metadata.arrow: one row per index row id, streamed part by part; key_order.arrow: the ids sorted by key.
    Parts without a metadata file get their row id as key and empty url/caption."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.int64()), ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()),
                        ("shard", pa.int64()), ("offset", pa.int64()), ("size", pa.int64())])
    # the dataset's additional input columns (--save-additional-columns), as text, from the parts' metadata
    extra = []
    for part in parts:
        if part.metadata:
            extra += [c for c in pq.read_schema(part.metadata).names
                      if c not in schema.names and c not in extra and c not in ("image_path", "__index_level_0__")]
    schema = pa.schema(list(schema) + [(c, pa.string()) for c in extra])
    path = os.path.join(out, "metadata.arrow")
    first = 0
    with atomic_path(path) as tmp, pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for part in parts:
            ids = pa.array(np.arange(first, first + part.count), pa.int64())
            have = pq.read_table(part.metadata) if part.metadata else pa.table({})
            cols = {"id": ids}
            for name in (*STANDARD_COLUMNS, *extra):
                field = schema.field(name)
                if name == "key" and name not in have.column_names and "image_path" in have.column_names:
                    col = have.column("image_path")  # clip-retrieval's own metadata names the image by its path
                elif name in have.column_names:
                    col = have.column(name)
                elif name == "key":
                    col = pc.cast(ids, pa.string())
                else:
                    col = pa.nulls(part.count, field.type)
                cols[name] = pc.cast(col, field.type)
            writer.write_table(pa.table(cols, schema=schema), max_chunksize=65_536)
            first += part.count
    table = pa.ipc.open_file(pa.memory_map(path)).read_all()
    order = pc.sort_indices(table.column("key"))
    with atomic_path(os.path.join(out, "key_order.arrow")) as tmp, pa.OSFile(tmp, "wb") as sink, \
            pa.ipc.new_file(sink, pa.schema([("id", pa.int64())])) as writer:
        writer.write_table(pa.table({"id": pc.cast(order, pa.int64())}))


def shard_identities(dataset: str, info: dict) -> dict | None:
    """{shard file: [size, mtime_ns]} of a local dataset's shards (`info`: its dataset.json; None on an object
    store)."""
    if storage.is_remote(dataset):
        return None
    layout, fmt = DatasetLayout(dataset), shard_format(info)
    out = {}
    for n in info.get("shards", []):
        path = layout.shard_path(n, fmt)
        if os.path.isfile(path):
            st = os.stat(path)
            out[os.path.basename(path)] = [st.st_size, st.st_mtime_ns]
    return out


def build_index(cfg: IndexBuildConfig) -> dict:
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise InputError(f"--out {cfg.out}: is a file, not an index directory")
    # one build per index folder (rank 0 holds it; the other ranks of a torchrun build only embed)
    rank = int(os.environ.get("RANK", 0))
    with writer_lock(cfg.out, "index.lock", "index build", "index") if rank == 0 else contextlib.nullcontext():
        return _build_index(cfg)


def _build_index(cfg: IndexBuildConfig) -> dict:
    max_memory, build_memory = parse_bytes(cfg.max_memory), parse_bytes(cfg.max_build_memory)
    meta_path = os.path.join(cfg.out, INFO)
    m = digest = dim = None
    # torchrun's rank (as embed.dist_env; read here so that --embeddings needs no torch): with --embeddings there is
    # nothing to embed, and only rank 0 builds (every rank writing the same index files would race)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if cfg.embeddings and rank != 0:
        return {"rank": rank, "embedded": {"embedded_now": 0, "shards": 0}}
    if cfg.checkpoint:
        from ..train.checkpoint import checkpoint_path  # lazy: torch, only with a model
        from ..train.loading import load_model, resolve_device  # lazy: torch, only with a model

        m = load_model(cfg.checkpoint, resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", rank))))
        digest = sha256_file(checkpoint_path(cfg.checkpoint))
        dim = _model_dim(m)
    if os.path.isfile(meta_path) and IndexInfo.read(cfg.out, locate=False).checkpoint_sha256 != digest:
        raise InputError(f"{cfg.out}: built with another checkpoint; use a new --out or delete it")
    stats = {"undecodable": 0}
    t0 = time.time()
    if cfg.embeddings:
        emb_dir = os.path.abspath(cfg.embeddings)
    else:
        from .embed import embed_dataset, parts_identity  # lazy: torch, only with a model

        rows, _ = success_rows(cfg.data)
        # budgets and --factory are checked before the (long) embedding pass, on the rows the dataset holds
        if cfg.factory:
            ann.check_factory(cfg.factory, len(rows), dim)
        else:
            ann.choose_factory(len(rows), dim, max_memory, cfg.max_query_ms, build_memory)
        os.makedirs(cfg.out, exist_ok=True)
        emb_dir = os.path.join(os.path.abspath(cfg.out), "embeddings")
        identity = parts_identity(cfg.data, digest)
        stats = embed_dataset(m, cfg.data, cfg.out, batch_size=cfg.batch_size, workers=cfg.workers, fp16=cfg.fp16,
                              skip_damaged=cfg.skip_damaged,
                              progress=cfg.progress, rank=rank, world=world, identity=identity)
        if rank != 0:
            return {"rank": rank, "embedded": stats}
        del rows  # (rank 0: every part is in and records this identity: embed_dataset waited for them)
    t_embed = time.time() - t0
    parts, d = P.list_parts(emb_dir, "--embeddings" if cfg.embeddings else "embeddings")
    n = P.total(parts)
    if n == 0:
        raise InputError(f"{emb_dir}: the parts hold no vectors")
    if dim is not None and dim != d:
        raise InputError(f"--checkpoint {cfg.checkpoint}: its model embeds into {dim} dims, the "
                         f"embeddings have {d}")
    if cfg.factory:
        ann.check_factory(cfg.factory, n, d)
        factory, why = cfg.factory, "given with --factory"
    else:
        factory, why = ann.choose_factory(n, d, max_memory, cfg.max_query_ms, build_memory)
    os.makedirs(cfg.out, exist_ok=True)
    t1 = time.time()
    # held-out queries: captions (text->image, the main use) and images
    held = P.sample_ids(n, min(n, 500), seed=1)
    rng = np.random.default_rng(0)
    rng.shuffle(held)
    with_text = P.has_text(parts)
    half = len(held) // 2 if with_text else 0
    text_ids, image_ids = np.sort(held[:half]), np.sort(held[half:])
    queries = np.concatenate([P.gather(parts, "text", text_ids) if half else np.zeros((0, d), np.float32),
                              P.gather(parts, "image", image_ids)])
    k = min(cfg.k, n)
    exclude = n > k  # a query that is a vector of the index finds itself: recall is measured past it
    files, tunings = {}, {}
    for name, kind in (("index.faiss", "image"), ("captions.faiss", "text")):
        if kind == "text" and not with_text:
            continue
        try:
            built = ann.build_streamed(parts, kind, factory, os.path.join(cfg.out, name), build_memory,
                                       progress=cfg.progress)
        except RuntimeError as err:  # e.g. PQ codes that need more training points than the dataset has
            msg = str(err).strip().splitlines()[-1].split(": ", 1)[-1][:160]
            raise InputError(f"--factory {factory!r}: faiss could not train it on {n:,} vectors ({msg})") from None
        none = np.full(len(text_ids) if kind == "image" else len(image_ids), -1)
        own = (np.concatenate([none, image_ids]) if kind == "image" else np.concatenate([text_ids, none])) \
            if exclude else None
        _, exact = ann.exact_knn_streamed(parts, kind, queries, k + exclude, rows=ann.chunk_rows(build_memory, d))
        index = ann.ShardFiles(cfg.out, built["files"])
        tunings[name] = ann.tune(index, factory, exact, queries, k, cfg.target_recall, self_ids=own,
                                 max_ms=cfg.max_query_ms)
        files[name] = built
        del index
    t_index = time.time() - t1
    write_metadata(parts, cfg.out)
    dataset = storage.resolve(cfg.data) if cfg.data else None  # a local folder or an fsspec URL (s3://...)
    out_abs = os.path.abspath(cfg.out)
    # paths both absolute and relative to the index folder: serve from any directory, and move the index folder
    # (with or without what it names); the checkpoint's sha256 says it is the same file
    ckpt_abs = os.path.abspath(m.checkpoint) if m else None
    ds_info = read_info(cfg.data) if cfg.data else {}  # dataset.json, once: format, id and shard identities
    info = IndexInfo(
        checkpoint=ckpt_abs, checkpoint_sha256=digest,
        checkpoint_relative=os.path.relpath(ckpt_abs, out_abs) if ckpt_abs else None,
        embeddings_relative=os.path.relpath(emb_dir, out_abs),
        model_arch=m.arch if m else None, step=m.step if m else None, dataset=dataset,
        dataset_format=shard_format(ds_info) if cfg.data else None, embeddings=emb_dir,
        dataset_id=dataset_id(ds_info) if cfg.data else None,
        dataset_shards=shard_identities(cfg.data, ds_info) if cfg.data else None,
        count=int(n), dim=int(d), factory=factory, why=why,
        budgets={"max_memory": cfg.max_memory, "max_build_memory": cfg.max_build_memory,
                 "max_query_ms": cfg.max_query_ms},
        files={k_: v["files"] for k_, v in files.items()},
        layout={k_: ("single index" if len(v["files"]) == 1 else
                     f"{len(v['files'])} IVF shards of {v['rows_per_shard']:,} rows, one quantizer, searched "
                     f"together") for k_, v in files.items()},
        search_params={k_: {"param": v["param"], "value": v["value"],
                            **({"k_factor": v["k_factor"]} if "k_factor" in v else {})}
                       for k_, v in tunings.items()},
        recall_at_k={k_: {"k": k, "recall": v["recall"], "ms_per_query": v.get("ms_per_query")}
                     for k_, v in tunings.items()},
        embeddings_dtype=str(P.vectors(parts[0], "image").dtype), embed_s=round(t_embed, 2),
        index_build_s=round(t_index, 2), undecodable_images=stats.get("undecodable", 0))
    missed = {name: ann.budget_message(name, t, factory, "--max-memory") for name, t in tunings.items()
              if "missed" in t}
    if missed:  # recorded, said in one line each, and (with --strict) a failure once index.json is written
        info.budget_missed = {name: {"message": msg, **tunings[name]["missed"]} for name, msg in missed.items()}
        for msg in missed.values():
            log.warning("warning: %s", msg)
    info.write(cfg.out)
    if missed and cfg.strict:
        raise PsdclipError(f"--strict: {next(iter(missed.values()))}")
    return info.to_dict()
