"""Decontamination (`psdclip data subset --exclude-near EVAL`): the samples whose image is a copy of an evaluation
image are left out of a subset, counted by reason (DataComp's de-duplication against its evaluation sets).

- exact: the sample's sha256 (img2dataset's hash of the downloaded bytes, in the manifest) is an evaluation file's.
- near: the perceptual hash (pHash: the signs of the 8x8 lowest frequencies of the 32x32 grey image's DCT, 64
  bits) of the stored image is within `max_hamming` bits of an evaluation image's, or of its mirror image's (so
  resized, re-encoded and horizontally flipped copies are caught).

EVAL is an image folder (walked), a retrieval CSV/JSONL (its image column) or a synthetic source (its held-out
renderings). The client holds the evaluation hashes and one shard's samples at a time; the excluded keys (a few,
by nature) are listed in the subset's file with the count per reason.
"""
from __future__ import annotations

import hashlib
import io
import os

import numpy as np
from PIL import Image

from ..core.errors import InputError

from .format import image_of, manifest_file, read_info, shard_format
from .reader import manifest_table, shard_samples, tar_samples, wds_layout_shards

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    m = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n))
    m[0] /= np.sqrt(2)
    return m


_DCT = _dct_matrix(32)


def phash(image: Image.Image) -> int:
    grey = np.asarray(image.convert("L").resize((32, 32), Image.LANCZOS), dtype=np.float64)
    low = (_DCT @ grey @ _DCT.T)[:8, :8].ravel()
    bits = low[1:] > np.median(low[1:])  # (the DC term left out: brightness alone says nothing)
    return int("".join("1" if b else "0" for b in bits), 2)


def eval_images(spec: str) -> list[str]:
    """The image files of an evaluation set: a folder, a retrieval CSV/JSONL, or a synthetic source (a webdataset
    layout's images lie inside its shards: eval_image_bytes reads them)."""
    if os.path.isdir(os.path.join(spec, "heldout")):
        spec = os.path.join(spec, "heldout")
    if os.path.isdir(spec):
        return sorted(os.path.join(d, f) for d, _, files in os.walk(spec) for f in files
                      if f.lower().endswith(IMAGE_EXTENSIONS))
    if os.path.isfile(spec):
        import pandas as pd

        df = pd.read_json(spec, lines=True) if spec.endswith((".jsonl", ".json")) else pd.read_csv(spec)
        if "image" not in df.columns:
            raise InputError(f"--exclude-near {spec}: a retrieval list needs an image column")
        base = os.path.dirname(os.path.abspath(spec))
        return [p if os.path.isabs(p) else os.path.join(base, p) for p in df["image"].astype(str).unique()]
    raise InputError(f"--exclude-near {spec}: no such folder or file")


def eval_image_bytes(spec: str):
    """Each evaluation image's stored bytes: the files of eval_images, or, for a folder in CLIP_benchmark's
    webdataset layout (test/*.tar with webp/jpg/png samples, no loose images), each sample's image."""
    files = eval_images(spec)
    tars = wds_layout_shards(spec) if not files and os.path.isdir(spec) else []
    if tars:
        broken = []
        for sample in tar_samples(tars, broken.append):
            raw = image_of(sample)
            if raw is not None:
                yield raw
        if broken:
            raise InputError(f"--exclude-near {spec}: a shard of its webdataset layout could not be read "
                             f"({' '.join(str(broken[0]).split())[:200]})")
        return
    for path in files:
        with open(path, "rb") as f:
            yield f.read()


def eval_hashes(spec: str) -> tuple[set, np.ndarray]:
    """(sha256 of every evaluation image's bytes, the pHashes of every evaluation image and of its mirror)."""
    shas, hashes = set(), []
    for data in eval_image_bytes(spec):
        shas.add(hashlib.sha256(data).hexdigest())
        try:
            with Image.open(io.BytesIO(data)) as im:
                im = im.convert("RGB")
                hashes += [phash(im), phash(im.transpose(Image.FLIP_LEFT_RIGHT))]
        except Exception:  # pylint: disable=broad-except  (an evaluation file that does not decode: sha256 only)
            continue
    if not shas:
        raise InputError(f"--exclude-near {spec}: no images there")
    return shas, np.asarray(hashes, dtype=np.uint64)


def _popcount(x: np.ndarray) -> np.ndarray:
    """The set bits of each uint64."""
    x = np.ascontiguousarray(x, dtype=np.uint64)
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)


class Decontaminator:
    """The evaluation set's hashes, and the copies of its images among one shard's samples at a time."""

    def __init__(self, dataset: str, spec: str, max_hamming: int):
        self.dataset, self.fmt = dataset, shard_format(read_info(dataset))
        self.spec, self.max_hamming = spec, max_hamming
        self.shas, self.hashes = eval_hashes(spec)

    def shard(self, n: int, taken: set) -> tuple[set, set]:
        """(exact copies, near copies) among the keys `taken` of shard n."""
        m = manifest_table(manifest_file(self.dataset, shard=n), columns=["key", "sha256"]).to_pandas()
        exact = set(m.loc[m["sha256"].isin(self.shas), "key"]) & taken
        near = set()
        for s in shard_samples(self.dataset, self.fmt, n, lambda msg: None):
            key = s.get("__key__")
            if key not in taken or key in exact:
                continue
            try:
                with Image.open(io.BytesIO(image_of(s))) as im:
                    h = np.uint64(phash(im.convert("RGB")))
            except Exception:  # pylint: disable=broad-except  (an undecodable sample: no hash to match)
                continue
            if len(self.hashes) and int(_popcount(self.hashes ^ h).min()) <= self.max_hamming:
                near.add(key)
        return exact, near
