"""Embedding parts in clip-retrieval's inference layout, read out of core.

    DIR/img_emb/img_emb_<part>.npy          (n_part, d) float16/float32 image vectors, L2-normalised
    DIR/text_emb/text_emb_<part>.npy        (n_part, d) caption vectors (optional)
    DIR/metadata/metadata_<part>.parquet    n_part rows: key, url, caption, ... (optional)

Row i of a part's three files describe the same sample; parts are taken in natural order of <part> (psdclip
writes the dataset shard number, zero-padded), and an index row id is the position in that order. Arrays are
opened memory-mapped, so reading a sample or a chunk costs the rows read, never the collection.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..core.errors import InputError

KINDS = {"image": ("img_emb", "img_emb_"), "text": ("text_emb", "text_emb_")}


@dataclass(frozen=True)
class Part:
    name: str
    count: int
    image: str
    text: str | None
    metadata: str | None


def part_paths(root: str, name: str) -> dict[str, str]:
    return {"image": os.path.join(root, "img_emb", f"img_emb_{name}.npy"),
            "text": os.path.join(root, "text_emb", f"text_emb_{name}.npy"),
            "metadata": os.path.join(root, "metadata", f"metadata_{name}.parquet")}


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _open(path: str, what: str) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise InputError(f"{what} {path}: not a .npy array ({str(err).splitlines()[0][:120]})") from None
    if arr.ndim != 2 or arr.dtype.kind != "f":
        raise InputError(f"{what} {path}: expected a 2-d float array, got {arr.dtype} of shape {arr.shape}")
    return arr


def list_parts(root: str, what: str = "--embeddings") -> tuple[list[Part], int]:
    """The parts under root and the vectors' dimension; a one-line error for a missing folder, mismatched
    dimensions or row counts that differ between a part's files."""
    img_dir = os.path.join(root, "img_emb")
    if not os.path.isdir(img_dir):
        raise InputError(f"{what} {root}: no img_emb/ folder (expected clip-retrieval's layout: "
                         f"img_emb/img_emb_*.npy, optional text_emb/ and metadata/)")
    names = sorted((f[len("img_emb_"):-4] for f in os.listdir(img_dir)
                    if f.startswith("img_emb_") and f.endswith(".npy")), key=_natural)
    if not names:
        raise InputError(f"{what} {root}: img_emb/ holds no img_emb_*.npy file")
    parts, dim = [], None
    for name in names:
        paths = part_paths(root, name)
        img = _open(paths["image"], what)
        dim = img.shape[1] if dim is None else dim
        if img.shape[1] != dim:
            raise InputError(f"{what} {paths['image']}: {img.shape[1]} dimensions, the other parts have {dim}")
        text = paths["text"] if os.path.isfile(paths["text"]) else None
        if text and (shape := _open(text, what).shape) != img.shape:
            raise InputError(f"{what} {text}: shape {shape} differs from its images' {img.shape}")
        meta = paths["metadata"] if os.path.isfile(paths["metadata"]) else None
        if meta:
            import pyarrow.parquet as pq

            try:
                rows = pq.ParquetFile(meta).metadata.num_rows
            except Exception as err:  # pylint: disable=broad-except  (any unreadable file is bad input)
                raise InputError(f"{what} {meta}: not a Parquet file ({str(err).splitlines()[0][:120]})") from None
            if rows != len(img):
                raise InputError(f"{what} {meta}: {rows:,} rows for {len(img):,} image vectors")
        parts.append(Part(name, len(img), paths["image"], text, meta))
    return parts, int(dim)


def has_text(parts: list[Part]) -> bool:
    return all(p.text for p in parts)


def total(parts: list[Part]) -> int:
    return sum(p.count for p in parts)


def vectors(part: Part, kind: str) -> np.ndarray:
    """A part's array, memory-mapped (shape and dtype; reading it maps its pages into the reader)."""
    return np.load(part.image if kind == "image" else part.text, mmap_mode="r")


def _layout(path: str) -> tuple[int, tuple, np.dtype]:
    """(data offset, shape, dtype) of a .npy file, from its header."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran:
            raise InputError(f"{path}: a Fortran-ordered array; save it C-ordered")
        return f.tell(), shape, dtype


def chunks(parts: list[Part], kind: str, rows: int, start: int = 0, stop: int | None = None
           ) -> Iterator[tuple[int, np.ndarray]]:
    """(first row id, float32 chunk of at most `rows` vectors) over the row ids [start, stop), in order. Read with
    plain file reads, not memory maps: streaming a collection leaves it in the page cache, not in the process."""
    stop = total(parts) if stop is None else stop
    first = 0
    for part in parts:
        lo, hi = max(start, first), min(stop, first + part.count)
        if lo < hi:
            path = part.image if kind == "image" else part.text
            offset, shape, dtype = _layout(path)
            with open(path, "rb") as f:
                f.seek(offset + (lo - first) * shape[1] * dtype.itemsize)
                for i in range(lo, hi, rows):
                    m = min(hi, i + rows) - i
                    x = np.fromfile(f, dtype=dtype, count=m * shape[1]).reshape(m, shape[1])
                    yield i, np.ascontiguousarray(x, dtype=np.float32)
        first += part.count


def gather(parts: list[Part], kind: str, ids: np.ndarray) -> np.ndarray:
    """The vectors of the given row ids (any order), one positioned read per row, part by part."""
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    bounds = np.cumsum([0] + [p.count for p in parts])
    out = None
    for j, part in enumerate(parts):
        lo, hi = np.searchsorted(sorted_ids, [bounds[j], bounds[j + 1]])
        path = part.image if kind == "image" else part.text
        offset, shape, dtype = _layout(path)
        if out is None:
            out = np.empty((len(ids), shape[1]), dtype=np.float32)
        if hi <= lo:
            continue
        row = shape[1] * dtype.itemsize
        fd = os.open(path, os.O_RDONLY)
        try:
            local = sorted_ids[lo:hi] - bounds[j]
            buf = b"".join(os.pread(fd, row, offset + int(r) * row) for r in local)
        finally:
            os.close(fd)
        out[order[lo:hi]] = np.frombuffer(buf, dtype=dtype).reshape(-1, shape[1])
    return out


def sample_ids(n: int, size: int, seed: int = 0) -> np.ndarray:
    """`size` distinct row ids out of n, sorted (sequential reads)."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
