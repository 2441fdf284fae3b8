"""Encode every successful image (and its caption) of a dataset with a checkpoint's model.

Images are read by byte offset from the shards (the manifest says where each one lies) through a
multi-worker DataLoader. Embeddings are written per shard (embeddings/img_<shard>.npy, txt_<shard>.npy,
keys_<shard>.npy, each renamed into place), so an interrupted run resumes at the next unfinished shard.
"""
from __future__ import annotations

import io
import os
import sys
from functools import lru_cache

import numpy as np
import pandas as pd
import torch
from PIL import Image

from psdclip.pipeline.dataset import atomic_path, read_json
from psdclip.pipeline.errors import InputError
from psdclip.pipeline.status import SUCCESS
from psdclip.train.checkpoint import LoadedModel


class ShardImages(torch.utils.data.Dataset):
    """Images of manifest rows, read from their shard at their offset (tars) or row (Arrow shards)."""

    def __init__(self, root: str, rows: pd.DataFrame, fmt: str, transform, size: tuple[int, int]):
        self.root, self.fmt, self.transform, self.size = root, fmt, transform, size
        self.shards = rows["shard"].astype(int).to_numpy()
        self.offsets = rows["offset"].astype(int).to_numpy()
        self.sizes = rows["size"].astype(int).to_numpy()

    def __len__(self):
        return len(self.shards)

    def __getitem__(self, i):
        data = read_image_bytes(self.root, self.fmt, int(self.shards[i]), int(self.offsets[i]), int(self.sizes[i]))
        try:
            with Image.open(io.BytesIO(data)) as im:
                return self.transform(im.convert("RGB")), True
        except Exception:  # pylint: disable=broad-except  (counted by the caller)
            return torch.zeros(3, *self.size), False


def read_image_bytes(root: str, fmt: str, shard: int, offset: int, size: int) -> bytes:
    if fmt == "arrow":
        return _arrow_table(os.path.join(root, "shards", f"{shard:05d}.parquet")).column("jpg")[offset].as_py()
    with open(os.path.join(root, "shards", f"{shard:05d}.tar"), "rb") as f:
        f.seek(offset)
        return f.read(size)


@lru_cache(maxsize=4)
def _arrow_table(path):
    import pyarrow.parquet as pq

    return pq.read_table(path)


def success_rows(dataset: str) -> tuple[pd.DataFrame, str]:
    manifest = os.path.join(dataset, "manifest.parquet")
    if not os.path.isfile(manifest):
        raise InputError(f"--data {dataset}: not a psdclip dataset (no manifest.parquet)")
    fmt = read_json(os.path.join(dataset, "dataset.json")).get("output_format", "webdataset")
    m = pd.read_parquet(manifest, columns=["key", "url", "caption", "status", "shard", "offset", "size"])
    ok = m[m["status"] == SUCCESS].sort_values(["shard", "offset"]).reset_index(drop=True)
    if ok.empty:
        raise InputError(f"--data {dataset}: no successful samples to index")
    return ok, fmt


def _save(path: str, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


@torch.no_grad()
def embed_dataset(loaded: LoadedModel, dataset: str, out: str, *, batch_size: int = 256, workers: int = 2,
                  fp16: bool = False, progress: bool = True) -> dict:
    model, preprocess, tokenizer, device = loaded.model, loaded.preprocess, loaded.tokenizer, loaded.device
    rows, fmt = success_rows(dataset)
    size = loaded.image_size
    emb_dir = os.path.join(out, "embeddings")
    os.makedirs(emb_dir, exist_ok=True)
    dtype = np.float16 if fp16 else np.float32
    done = skipped = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(rows), desc="embed", unit="img", file=sys.stderr)
    for shard, part in rows.groupby("shard", sort=True):
        shard = int(shard)
        paths = [os.path.join(emb_dir, f"{kind}_{shard:05d}.npy") for kind in ("img", "txt", "keys")]
        if all(os.path.isfile(p) for p in paths):
            if bar:
                bar.update(len(part))
            continue
        loader = torch.utils.data.DataLoader(ShardImages(dataset, part, fmt, preprocess, size),
                                             batch_size=batch_size, num_workers=workers)
        feats, oks = [], []
        for images, ok in loader:
            feats.append(model.encode_image(images.to(device), normalize=True).float().cpu().numpy())
            oks.append(ok.numpy().astype(bool))
            if bar:
                bar.update(len(ok))
        ok = np.concatenate(oks)
        skipped += int((~ok).sum())
        if not ok.any():
            continue
        img, keep = np.concatenate(feats)[ok], part[ok]
        captions = keep["caption"].astype(str).tolist()
        txt = np.concatenate([model.encode_text(tokenizer(captions[i:i + 512]).to(device), normalize=True).float()
                              .cpu().numpy() for i in range(0, len(captions), 512)])
        _save(paths[0], img.astype(dtype))
        _save(paths[1], txt.astype(dtype))
        _save(paths[2], keep["key"].to_numpy().astype(str))
        done += len(keep)
    if bar:
        bar.close()
    return {"rows": len(rows), "embedded_now": done, "undecodable": skipped}


def load_embeddings(out: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image vectors, caption vectors, keys) over every shard, in shard order, as float32."""
    emb_dir = os.path.join(out, "embeddings")
    shards = sorted(f[4:-4] for f in os.listdir(emb_dir) if f.startswith("img_") and f.endswith(".npy"))
    img = np.concatenate([np.load(os.path.join(emb_dir, f"img_{s}.npy")) for s in shards]).astype(np.float32)
    txt = np.concatenate([np.load(os.path.join(emb_dir, f"txt_{s}.npy")) for s in shards]).astype(np.float32)
    keys = np.concatenate([np.load(os.path.join(emb_dir, f"keys_{s}.npy")) for s in shards])
    return img, txt, keys
