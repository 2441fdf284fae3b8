"""Atomic writes and the JSON / Parquet / Arrow helpers every stage reads and writes its own files with. Each write
replaces its target whole (storage.atomic_path: a temporary name beside it, fsync, rename; one upload on an object
store), so a reader sees the old file or the new one, never half of either; each read of a damaged file is a
one-line InputError naming it."""
from __future__ import annotations

import datetime as _dt
import json
import math
import os

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .errors import InputError

atomic_path = storage.atomic_path  # a temporary local path that replaces `path` whole when the block ends


def now() -> str:
    """The current UTC time, ISO 8601 to the second: the created-at stamp of our files."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def _strict(obj):
    """obj with NaN and infinities as null: JSON has no such numbers, and strict parsers refuse Python's NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if hasattr(obj, "dtype") and getattr(obj, "ndim", 1) == 0:  # numpy scalars
        return _strict(obj.item())
    return obj


def write_json(path: str, obj, indent: int = 2) -> None:
    """Strict JSON (NaN and infinities written as null), replaced whole."""
    write_text(path, json.dumps(_strict(obj), indent=indent, ensure_ascii=False, default=str, allow_nan=False) + "\n")


def write_parquet(path: str, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)


def read_json(path: str):
    """A JSON file of ours; a damaged one is a one-line error naming it."""
    try:
        with storage.open_file(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: damaged (not valid JSON: {err})") from None


def read_parquet_table(path: str, **kw) -> pa.Table:
    """pq.read_table of a file of ours, local or in an object store."""
    fs, p = storage.arrow_filesystem(path)
    return pq.read_table(p, filesystem=fs, **kw)


def read_parquet(path: str, columns=None) -> pd.DataFrame:
    return read_parquet_table(path, columns=columns).to_pandas()


def read_feather(path: str, columns=None) -> pa.Table:
    """An Arrow IPC file of ours (memory-mapped when local)."""
    import pyarrow.feather as feather

    if not storage.is_remote(path):
        return feather.read_table(path, columns=columns)
    with storage.open_file(path) as f:
        return feather.read_table(pa.BufferReader(f.read()), columns=columns)


def sha256_file(path: str) -> str:
    """The sha256 of a local file, read 1 MB at a time (a checkpoint's identity in index.json)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()



def made_from_differs(path: str, wanted: dict) -> list[str]:
    """The keys of `wanted` whose value differs in the JSON record at `path` of what something reused (a bank, scores)
    was made from; [] when there is no record yet. The caller refuses, in one line, what differs."""
    if not os.path.isfile(path):
        return []
    before = read_json(path)
    return sorted(k for k in wanted if before.get(k) != wanted[k])
