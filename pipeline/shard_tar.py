"""The WebDataset shard format (`--format webdataset`, the default): NNNNN.tar with <key>.<image ext>, <key>.txt and
<key>.json per sample, as img2dataset writes it. Its writer (for the downloader), its sample reader (webdataset's tar
reader with a check that each tar really ended), its reorder pass and its one-image read by byte offset.
Registered in format.py's SHARD_FORMATS."""
from __future__ import annotations

import io
import json
import tarfile

from ..core import storage

from .format import ShardFormat
from .reader import tar_samples  # the one tar reader (also of CLIP_benchmark's wds layout)


class TarWriter:
    """Samples appended to a tar; `add` returns the image's byte offset in the file."""

    def __init__(self, path: str, ext: str):
        self.ext = ext
        self.tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)

    def add(self, key: str, image: bytes, caption: str, meta: dict) -> int:
        offset = self.tar.offset + tarfile.BLOCKSIZE  # a USTAR header for a short name is one 512-byte block
        for suffix, data in ((self.ext, image), ("txt", caption.encode()),
                             ("json", json.dumps(meta, ensure_ascii=False, default=str).encode())):
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mode, info.mtime = len(data), 0o444, 0
            self.tar.addfile(info, io.BytesIO(data))
        return offset

    def close(self) -> None:
        self.tar.close()


def reorder(path: str, order: list[str], out: str) -> dict[str, int]:
    """Write the tar's samples in `order` to `out`; returns each image's new byte offset."""
    offsets: dict[str, int] = {}
    with tarfile.open(path, "r") as src:
        members: dict[str, list] = {}
        for m in src.getmembers():
            members.setdefault(m.name.split(".", 1)[0], []).append(m)
        with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as dst:
            for k in order:
                for m in members.get(k, []):
                    if k not in offsets:  # the image comes first: its data follows its one-block header
                        offsets[k] = dst.offset + tarfile.BLOCKSIZE
                    dst.addfile(m, src.extractfile(m))
    return offsets


def image_bytes(path: str, offset: int, size: int) -> bytes:
    """One stored image: `size` bytes at byte `offset` of the tar."""
    with storage.open_file(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


FORMAT = ShardFormat(name="webdataset", extension="tar", writer=TarWriter, samples=tar_samples, reorder=reorder,
                     image_bytes=image_bytes)
