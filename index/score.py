"""psdclip data score: each successful sample's image–caption cosine similarity under a checkpoint (DataComp's CLIP
score), shard by shard, as data beside the manifest:

    DATASET/scores/NAME/score.json             what the scores were made from (dataset id, checkpoint and its
                                               sha256, the column) and the score files' layout
    DATASET/scores/NAME/shard-NNNNN.parquet    key, clip_score: one row per successful sample of shard NNNNN
                                               (with --near-duplicates also nn_similarity, nn_key: the highest
                                               cosine of its image embedding to another sample's, and that key)
    DATASET/scores/NAME/embeddings/            the parts the scores come from (clip-retrieval's layout)

The samples are embedded as `index build` embeds them (embed.py: whole shards per DataLoader worker, every rank
under torchrun taking every WORLD_SIZE-th shard, resumable per shard), or their vectors are taken from an index
built with the same checkpoint on the same dataset (`--embeddings INDEX/embeddings`, checked by its made_from.json:
nothing is encoded again). A shard's score file is written once its part is in (renamed into place), so a run cut
off continues at the next shard. Scores made from another checkpoint or dataset are refused, never mixed. The score
files are plain Parquet, readable with pyarrow or DuckDB without psdclip; `psdclip data subset` thresholds them.

`--near-duplicates` adds each sample's nearest other image in the dataset (DataComp's near-duplicate measure in
embedding space): exact inner products over the normalised image vectors, blocked so that two parts (and a block
of 1,024 queries against one part) are in memory at a time: O(N^2 d) work and O(shard) memory; a shard's file is
rewritten with the two columns once its search is done, so a cut-off run continues at the next shard.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..core.errors import InputError
from ..core.locks import writer_lock
from ..core.names import check_name
from ..core.io import atomic_path, made_from_differs, sha256_file, write_json
from ..pipeline.format import SCORE_COLUMN as COLUMN
from ..pipeline.format import read_info, score_folder
from . import parts as P


def default_name(checkpoint: str) -> str:
    base = os.path.basename(os.path.normpath(checkpoint))
    if base.endswith(".pt"):
        parent = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint))))
        base = f"{parent}-{base[:-3]}" if parent else base[:-3]
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in base).lstrip(".") or "scores"


NN_COLUMNS = ("nn_similarity", "nn_key")
BLOCK = 1024


def near_duplicates(parts: list, folder: str) -> int:
    """Add nn_similarity and nn_key to every score file that lacks them (see the module docstring); returns how many
    shards were searched now."""
    keys = {}  # part name -> its keys, read when that part is the gallery
    searched = 0
    for pi in parts:
        out = os.path.join(folder, f"shard-{int(pi.name):05d}.parquet")
        table = pq.read_table(out)
        if NN_COLUMNS[0] in table.column_names:
            continue
        q = np.asarray(P.vectors(pi, "image"), np.float32)
        best = np.full(len(q), -np.inf, np.float32)
        who = np.full(len(q), "", dtype=object)
        for pj in parts:
            g = np.asarray(P.vectors(pj, "image"), np.float32)
            if pj.name not in keys:
                keys = {pj.name: np.asarray(pq.read_table(pj.metadata, columns=["key"]).column("key").to_pylist(),
                                            dtype=object)}
            for a in range(0, len(q), BLOCK):
                sims = q[a:a + BLOCK] @ g.T
                if pj.name == pi.name:  # not itself
                    rows = np.arange(len(sims))
                    sims[rows, a + rows] = -np.inf
                j = sims.argmax(axis=1)
                top = sims[np.arange(len(sims)), j]
                better = top > best[a:a + BLOCK]
                best[a:a + BLOCK][better] = top[better]
                who[a:a + BLOCK][better] = keys[pj.name][j[better]]
        own = table.column("key").to_pylist()
        mine = pq.read_table(pi.metadata, columns=["key"]).column("key").to_pylist()
        if own != mine:
            raise InputError(f"{out}: its keys are not the embedding part's ({pi.name}); delete the scores to redo them")
        best[~np.isfinite(best)] = np.nan  # a dataset of one sample: no other image
        table = table.append_column(NN_COLUMNS[0], pa.array(best, pa.float32())).append_column(
            NN_COLUMNS[1], pa.array(who.tolist(), pa.string()))
        with atomic_path(out) as tmp:
            pq.write_table(table, tmp)
        searched += 1
    return searched


def score(cfg) -> dict | None:
    """Write DATASET/scores/NAME/ (see the module's docstring); returns what was written (None on a rank other than
    0, which only embeds). One `data score` writes a scores folder at a time (rank 0 holds its lock)."""
    read_info(cfg.dataset, "DATASET")  # a dataset, before anything is written into it
    folder = score_folder(cfg.dataset, check_name("--name", cfg.name or default_name(cfg.checkpoint)))
    first = int(os.environ.get("RANK", 0)) == 0
    with writer_lock(folder, "score.lock", "data score", "scores folder", "--name") if first else \
            contextlib.nullcontext():
        return _score(cfg)


def _score(cfg) -> dict | None:
    from ..train.checkpoint import checkpoint_path  # lazy: torch, only with a model
    from ..train.loading import load_model, resolve_device  # lazy: torch, only with a model
    from .embed import dist_env, embed_dataset, parts_identity, stale_parts  # lazy: torch, only with a model

    name = check_name("--name", cfg.name or default_name(cfg.checkpoint))
    folder = score_folder(cfg.dataset, name)
    ckpt = checkpoint_path(cfg.checkpoint)
    digest = sha256_file(ckpt)
    identity = parts_identity(cfg.dataset, digest)
    made = {**identity, "checkpoint": os.path.abspath(ckpt), "column": COLUMN,
            "layout": "shard-NNNNN.parquet: key, clip_score (cosine of the image and caption embeddings)"}
    meta_path = os.path.join(folder, "score.json")
    changed = made_from_differs(meta_path, identity)
    if changed:
        raise InputError(f"{folder}: scores made from another {' and '.join(changed)}; give another --name or "
                         f"delete the folder")
    os.makedirs(folder, exist_ok=True)
    write_json(meta_path, made, indent=1)
    rank, world = dist_env()
    if cfg.embeddings:
        emb_dir = os.path.abspath(cfg.embeddings)
        stale = stale_parts(emb_dir, identity)
        if stale:
            raise InputError(f"--embeddings {cfg.embeddings}: made from another {', '.join(stale)} than DATASET "
                             f"and --checkpoint; score without --embeddings to encode the samples")
        if rank != 0:
            return None
    else:
        loaded = load_model(cfg.checkpoint, resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", rank))))
        emb_dir = os.path.join(folder, "embeddings")
        embed_dataset(loaded, cfg.dataset, folder, batch_size=cfg.batch_size, workers=cfg.workers, skip_damaged=cfg.skip_damaged,
                      progress=cfg.progress, rank=rank, world=world, identity=identity)
        if rank != 0:
            return None  # (rank 0 has every part once embed_dataset returns)
    parts, _ = P.list_parts(emb_dir, "--embeddings")
    if not P.has_text(parts):
        raise InputError(f"{emb_dir}: the parts hold no caption embeddings (text_emb/): no image-caption score")
    written = 0
    for part in parts:
        out = os.path.join(folder, f"shard-{int(part.name):05d}.parquet")
        if os.path.isfile(out):
            continue
        img, txt = P.vectors(part, "image"), P.vectors(part, "text")
        scores = np.einsum("ij,ij->i", np.asarray(img, np.float32), np.asarray(txt, np.float32))
        keys = pq.read_table(part.metadata, columns=["key"]).column("key")
        with atomic_path(out) as tmp:
            pq.write_table(pa.table({"key": keys, COLUMN: pa.array(scores, pa.float32())}), tmp)
        written += 1
    total = sum(p.count for p in parts)
    searched = near_duplicates(parts, folder) if cfg.near_duplicates else 0
    return {"name": name, "samples": total, "shard_files": len(parts), "written": written,
            "near_duplicates_searched": searched if cfg.near_duplicates else None, "folder": folder}
