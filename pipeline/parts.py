"""Input files cut into parts, one read task each: byte ranges of an uncompressed txt/csv/tsv/jsonl file (cut just
after a line end), row groups of a Parquet file, or the whole of a compressed file; and a file's content digest, by
which an ingested file is recognised."""
from __future__ import annotations

import dataclasses
import hashlib
import math

import pyarrow as pa

from ..core.errors import InputError

SPLIT_BYTES = 8 << 20  # text lists larger than this are read by several tasks (at least one per worker)
PART_BYTES = 64 << 20  # ... and by one task per this many bytes
TEXT_FORMATS = ("txt", "csv", "tsv", "jsonl")


@dataclasses.dataclass(frozen=True)
class Part:
    """One read task's share of an input file: bytes [start, stop) of a text file, some row groups of a Parquet
    file, or (count == 1) the whole file."""
    path: str
    fmt: str
    index: int
    count: int
    start: int = 0
    stop: int = -1
    row_groups: tuple = ()


def size_of(path: str) -> int:
    import fsspec

    try:
        fs, p = fsspec.core.url_to_fs(path)
        return int(fs.size(p) or 0)
    except Exception:  # pylint: disable=broad-except  (read whole by one task, which says what is wrong)
        return 0


def split_file(path: str, fmt: str, size: int, workers: int) -> list[Part]:
    """The parts of one input file (the client seeks to each cut and reads to the next line end)."""
    import fsspec
    from fsspec.utils import infer_compression

    part_bytes, split_bytes = PART_BYTES, SPLIT_BYTES
    if size <= split_bytes or infer_compression(path):
        return [Part(path, fmt, 0, 1)]
    n = max(workers, math.ceil(size / part_bytes))
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            with fsspec.open(path, "rb") as f:
                groups = pq.ParquetFile(f).metadata.num_row_groups
        except (OSError, pa.ArrowException):
            return [Part(path, fmt, 0, 1)]  # the read task names what is wrong
        n = min(n, groups)
        if n <= 1:
            return [Part(path, fmt, 0, 1)]
        cuts = [groups * k // n for k in range(n + 1)]
        return [Part(path, fmt, k, n, row_groups=tuple(range(cuts[k], cuts[k + 1]))) for k in range(n)]
    if fmt not in TEXT_FORMATS:
        return [Part(path, fmt, 0, 1)]
    cuts = [0]
    with fsspec.open(path, "rb") as f:
        for k in range(1, n):
            pos = max(size * k // n, cuts[-1] + 1)
            if pos >= size:
                break
            f.seek(pos - 1)
            while True:  # the first line start at or after pos
                block = f.read(1 << 16)
                if not block:
                    pos = size
                    break
                i = block.find(b"\n")
                if i >= 0:
                    pos = f.tell() - len(block) + i + 1
                    break
            if pos >= size:
                break
            cuts.append(pos)
    cuts.append(size)
    if len(cuts) <= 2:
        return [Part(path, fmt, 0, 1)]
    return [Part(path, fmt, k, len(cuts) - 1, start=cuts[k], stop=cuts[k + 1]) for k in range(len(cuts) - 1)]


def part_bytes(part: Part) -> bytes:
    import fsspec

    try:
        if part.count == 1:
            with fsspec.open(part.path, "rb", compression="infer") as f:
                return f.read()
        with fsspec.open(part.path, "rb") as f:
            f.seek(part.start)
            return f.read(part.stop - part.start)
    except FileNotFoundError:
        raise InputError(f"{part.path}: no such file") from None
    except Exception as err:  # pylint: disable=broad-except  (a corrupt .gz, remote storage without credentials)
        raise InputError(f"{part.path}: cannot read ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None


def header(part: Part) -> list[str]:
    """The column names of a CSV/TSV file (its first line), for a part that starts after it."""
    import csv

    import fsspec

    with fsspec.open(part.path, "rb") as f:
        first = f.readline().decode("utf-8-sig", errors="replace").rstrip("\r\n")
    return next(csv.reader([first], delimiter="," if part.fmt == "csv" else "\t"), [])


def file_sha256(path: str) -> str | None:
    """sha256 of a URL list's (decompressed) bytes, streamed; None if unreadable. An ingested file is recognised by
    it."""
    import fsspec

    h = hashlib.sha256()
    try:
        with fsspec.open(path, "rb", compression="infer") as f:
            for block in iter(lambda: f.read(8 << 20), b""):
                h.update(block)
    except Exception:  # pylint: disable=broad-except  (unreadable: the read tasks say why)
        return None
    return h.hexdigest()
