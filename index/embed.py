"""Encode every successful image (and its caption) of a dataset with a checkpoint's model, shard by shard.

Each shard is read once, front to back (webdataset's tar reader, or the Arrow shard's record batches): no seek
per image. DataLoader workers take whole shards and cut each shard into the same batches whatever the number of
workers or ranks, so the vectors do not depend on how the work was split. Under torchrun each rank takes every
WORLD_SIZE-th shard. A finished shard becomes one part in clip-retrieval's layout (see parts.py):

    OUT/embeddings/img_emb/img_emb_<shard>.npy, text_emb/text_emb_<shard>.npy, metadata/metadata_<shard>.parquet

each renamed into place, the metadata last: a part is complete when its metadata file exists, and an
interrupted run (any rank) resumes at the next unfinished shard.
"""
from __future__ import annotations

import io
import logging
import os
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from ..core.errors import PsdclipError
from ..core.io import atomic_path, write_parquet
from ..core import storage
from ..core.io import read_json, write_json
from ..pipeline.format import dataset_id, image_of, read_info
from ..pipeline.reader import shard_samples, success_rows
from ..train.loading import LoadedModel

from .parts import part_paths

log = logging.getLogger(__name__)

META_COLUMNS = ["key", "url", "caption", "shard", "offset", "size"]
TEXT_BATCH = 512


class ShardBatches(torch.utils.data.IterableDataset):
    """(shard, batch number, images, decoded mask) for each batch of each shard; a worker takes whole shards.
    Batch j of a shard holds its successful rows [j*B, (j+1)*B) in manifest order, whoever reads it."""

    def __init__(self, root: str, fmt: str, shards: list[tuple[int, list[str]]], transform, size, batch_size: int):
        self.root, self.fmt, self.shards, self.transform = root, fmt, shards, transform
        self.size, self.batch_size = tuple(size), batch_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = self.shards[info.id::info.num_workers] if info else self.shards
        for shard, keys in mine:
            yield from self._shard(shard, keys)

    def _samples(self, shard: int):
        def on_error(msg):
            log.warning("shard %05d: %s", shard, msg)

        return shard_samples(self.root, self.fmt, shard, on_error)

    def _shard(self, shard: int, keys: list[str]):
        B = self.batch_size
        where = {k: i for i, k in enumerate(keys)}
        nbatches = (len(keys) + B - 1) // B
        pending: dict[int, tuple[torch.Tensor, np.ndarray, list]] = {}

        def batch(j):
            n = min(B, len(keys) - j * B)
            return pending.setdefault(j, (torch.zeros(n, 3, *self.size), np.zeros(n, dtype=bool), [0]))

        for s in self._samples(shard):
            i = where.get(s.get("__key__"))
            if i is None:
                continue
            images, ok, seen = batch(i // B)
            raw = image_of(s)
            try:
                with Image.open(io.BytesIO(raw)) as im:
                    images[i % B] = self.transform(im.convert("RGB"))
                ok[i % B] = True
            except Exception:  # pylint: disable=broad-except  (counted as undecodable by the caller)
                pass
            seen[0] += 1
            if seen[0] == len(ok):
                yield shard, i // B, images, ok
                del pending[i // B]
        for j in range(nbatches):  # rows the shard did not hold (or a cut-off shard): not decoded
            if j in pending:
                images, ok, _ = pending.pop(j)
                yield shard, j, images, ok


def dist_env() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def part_done(emb_dir: str, shard: int, rows: int | None = None) -> bool:
    """The shard's part is complete (its metadata file exists, written last) and, with `rows`, holds that many rows:
    a part made while the shard was damaged (--skip-damaged) is not reused by a build that wants it whole."""
    path = part_paths(emb_dir, f"{shard:05d}")["metadata"]
    if not os.path.isfile(path):
        return False
    return rows is None or pq.ParquetFile(path).metadata.num_rows == rows


def _save(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


MADE_FROM = "made_from.json"  # in OUT/embeddings: the dataset and checkpoint its parts were embedded from


def parts_identity(dataset: str, checkpoint_sha256: str | None) -> dict:
    """What embedding parts are made from: the dataset (its id, written at build time; older datasets: its folder
    and creation time) and the checkpoint's sha256."""
    info = read_info(dataset)
    return {"dataset": storage.resolve(dataset), "dataset_id": dataset_id(info),
            "checkpoint_sha256": checkpoint_sha256}


def stale_parts(emb_dir: str, identity: dict) -> list[str]:
    """What differs between the parts in emb_dir and `identity` (every key, for parts that record nothing)."""
    path = os.path.join(emb_dir, MADE_FROM)
    if not os.path.isfile(path):
        return list(identity) if os.path.isdir(os.path.join(emb_dir, "metadata")) else []
    before = read_json(path)
    return [k for k, v in identity.items() if before.get(k) != v]


@torch.no_grad()
def embed_dataset(loaded: LoadedModel, dataset: str, out: str, *, batch_size: int = 256, workers: int = 2,
                  fp16: bool = False, progress: bool = True, rank: int = 0, world: int = 1,
                  identity: dict | None = None, skip_damaged: bool = False) -> dict:
    """Embed this rank's unfinished shards into OUT/embeddings (see the module docstring). Parts made from another
    dataset or checkpoint than `identity` names are embedded again, never reused by shard number. Rank 0 then
    waits for every rank's parts and records `identity` in OUT/embeddings/made_from.json: on return there, every
    part is in and is that identity's. A shard that cannot be read whole (an image undecodable or missing, a
    damaged tar) keeps no part and ends the call with one line (exit 1) once the other shards are in, unless
    `skip_damaged`: then its readable rows are kept, each damaged shard said in one line."""
    stats = _embed_mine(loaded, dataset, out, batch_size=batch_size, workers=workers, fp16=fp16, progress=progress,
                        rank=rank, world=world, identity=identity, skip_damaged=skip_damaged)
    shards = stats.pop("all_shards")
    if rank == 0:
        emb_dir = os.path.join(out, "embeddings")
        if world > 1:
            wait_for_parts(emb_dir, shards)
        if identity:
            write_json(os.path.join(emb_dir, MADE_FROM), identity)
    return stats


def wait_for_parts(emb_dir: str, shards: list[int], poll: float = 2.0) -> None:
    """Rank 0 waits for the other ranks' parts (torchrun stops every rank when one fails, so this cannot hang on a
    dead rank)."""
    missing = [s for s in shards if not part_done(emb_dir, s)]
    if missing:
        log.info("waiting for %d shards embedded by other ranks", len(missing))
    while missing:
        time.sleep(poll)
        missing = [s for s in missing if not part_done(emb_dir, s)]


def _embed_mine(loaded: LoadedModel, dataset: str, out: str, *, batch_size, workers, fp16, progress, rank, world,
                identity, skip_damaged) -> dict:
    model, tokenizer, device = loaded.model, loaded.tokenizer, loaded.device
    rows, fmt = success_rows(dataset)
    emb_dir = os.path.join(out, "embeddings")
    dtype = np.float16 if fp16 else np.float32
    groups = {int(s): part for s, part in rows.groupby("shard", sort=True)}
    mine = sorted(groups)[rank::world]
    stale = stale_parts(emb_dir, identity) if identity else []
    if stale:  # this rank's shards are embedded again (rank 0 records the new identity once every part is in)
        log.warning("%s: the embedding parts there were made from another %s; embedding again", emb_dir,
                    " and ".join(sorted({"dataset" if k.startswith("dataset") else "checkpoint" for k in stale})))
        names = {f.split("_", 2)[-1].split(".")[0] for sub in ("img_emb", "text_emb", "metadata")
                 if os.path.isdir(os.path.join(emb_dir, sub)) for f in os.listdir(os.path.join(emb_dir, sub))}
        mine_set = set(mine)
        for name in names:
            shard = int(name) if name.isdigit() else None
            # this rank's shards, and (rank 0) parts of shards this dataset does not have
            if shard in mine_set or (rank == 0 and shard not in groups):
                for path in part_paths(emb_dir, name).values():
                    if os.path.exists(path):
                        os.remove(path)
    todo = [s for s in mine if not part_done(emb_dir, s, None if skip_damaged else len(groups[s]))]
    stats = {"rows": len(rows), "shards": len(mine), "embedded_now": 0, "undecodable": 0, "all_shards": sorted(groups)}
    if not todo:
        return stats
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(groups[s]) for s in todo), desc=f"embed{f' rank {rank}' if world > 1 else ''}",
                   unit="img", file=sys.stderr)
    reader = ShardBatches(dataset, fmt, [(s, groups[s]["key"].tolist()) for s in todo], loaded.preprocess,
                          loaded.image_size, batch_size)
    loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=min(workers, len(todo)))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    received: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = {s: {} for s in todo}
    damaged: list[str] = []
    for shard, j, images, ok in loader:
        with autocast:
            feats = model.encode_image(images.to(device, non_blocking=True), normalize=True)
        received[shard][j] = (feats.float().cpu().numpy(), np.asarray(ok))
        if bar:
            bar.update(len(ok))
        part = groups[shard]
        if len(received[shard]) == -(-len(part) // batch_size):  # every batch of the shard is in
            got = received.pop(shard)
            img = np.concatenate([got[j][0] for j in sorted(got)])
            ok = np.concatenate([got[j][1] for j in sorted(got)])
            bad = int((~ok).sum())
            stats["undecodable"] += bad
            if bad:
                damaged.append(f"shard {shard:05d}: {bad:,} of {len(ok):,} images undecodable or missing")
                log.warning("%s%s", damaged[-1], ": indexed without them (--skip-damaged)" if skip_damaged else
                            ": no part kept")
                if not skip_damaged:
                    continue
            keep = part[ok]
            captions = keep["caption"].astype(str).tolist()
            with autocast:
                txt = [model.encode_text(tokenizer(captions[i:i + TEXT_BATCH]).to(device), normalize=True).float()
                       .cpu().numpy() for i in range(0, len(captions), TEXT_BATCH)]
            txt = np.concatenate(txt) if txt else np.zeros((0, img.shape[1]), np.float32)
            paths = part_paths(emb_dir, f"{shard:05d}")
            _save(paths["image"], img[ok].astype(dtype))
            _save(paths["text"], txt.astype(dtype))
            os.makedirs(os.path.dirname(paths["metadata"]), exist_ok=True)
            extra = [c for c in keep.columns if c not in META_COLUMNS and c != "status"]  # --save-additional-columns
            write_parquet(paths["metadata"], keep[META_COLUMNS + extra].reset_index(drop=True))  # last: part done
            stats["embedded_now"] += len(keep)
    if bar:
        bar.close()
    if damaged and not skip_damaged:
        raise PsdclipError(f"{len(damaged)} shard(s) of {dataset} could not be read whole ({'; '.join(damaged[:3])}"
                           f"{'; ...' if len(damaged) > 3 else ''}); the other shards' parts are kept: repair the "
                           f"dataset (rerun its `psdclip data build`) and run this again, or pass --skip-damaged to "
                           f"index what is readable")
    stats["damaged_shards"] = len(damaged)
    return stats
