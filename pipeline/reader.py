"""The one reader of a dataset's shards and manifest, used by the trainer, the index and the pipeline's own tools.

Shards are read front to back, one sample at a time, by their format's reader (format.SHARD_FORMATS: webdataset's tar
reader here, with a check that each tar really ended; pyarrow record batches in shard_arrow.py); the manifest is one
partitioned Parquet table read as a whole (`load_manifest`), one file at a time (`manifest_files`) or in batches of rows (`manifest_batches`). Every reader
reports a damaged file as a one-line error naming it (or, for shards, through the caller's `on_error`), never as a
traceback.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..core import storage
from ..core.errors import InputError
from ..core.io import read_parquet, read_parquet_table
from .dataset import (  # the build's own state: how far an unfinished build got
    Layout,
    unfinished_shards,
)
from .format import (
    MANIFEST_SCHEMA,
    DatasetLayout,
    extra_columns,
    manifest_file,
    manifest_schema,
    read_info,
    shard_format,
    shard_format_impl,
    shard_number,
)
from .status import SUCCESS

J = storage.join


class _TarEnd:
    """A shard's byte stream that can tell, once tarfile stops reading it, whether the tar really ended. tarfile
    ends a stream quietly at EOF on a member boundary and at an unreadable header, so a shard cut short between
    two members (a partial copy) would lose its tail unnoticed: a whole tar ends in zero blocks (the
    end-of-archive marker and its padding) and holds nothing but zeros after the point where tarfile stopped."""

    TAIL = 1024  # two 512-byte zero blocks

    def __init__(self, raw):
        self.raw, self.tail, self.eof = raw, b"", False

    def read(self, n=-1):
        data = self.raw.read(n)
        if not data and n != 0:
            self.eof = True
        self.tail = (self.tail + data)[-self.TAIL:]
        return data

    def problem(self) -> str | None:
        """None if the tar ended whole; else what is wrong (reads what tarfile left: normally its padding)."""
        while not self.eof:
            rest = self.read(1 << 20)
            if rest.strip(b"\0"):
                return "data after an unreadable tar header (a damaged shard)"
        if self.tail != bytes(self.TAIL):
            return "truncated (no end-of-archive blocks: a partial copy?)"
        return None

    def close(self) -> str | None:
        """Close the stream; what went wrong, if anything (a `pipe:` command's exit status is checked here)."""
        close = getattr(self.raw, "close", None)
        try:
            if close:
                close()
        except Exception as err:  # pylint: disable=broad-except
            return f"closing it failed ({err})"
        return None

    def __getattr__(self, name):
        return getattr(self.raw, name)

    def __repr__(self):
        return repr(self.raw)


def _open_shard(url: str, gopen):
    """A shard's byte stream: fsspec for object stores it knows (s3://, gs://, az://, ...: what the pipeline writes
    to; webdataset's gopen has no s3 handler and reaches gs through the gsutil command), webdataset's gopen for local
    files, pipe: commands and http(s)."""
    from fsspec.registry import known_implementations

    scheme = url.split("://", 1)[0] if storage.is_remote(url) else ""
    if scheme and scheme not in ("http", "https") and scheme in known_implementations:
        return storage.open_file(url, "rb")
    return gopen(url)


def wds_layout_shards(path: str) -> list[str]:
    """The shards of CLIP_benchmark's local webdataset layout (PATH/test/*.tar, or PATH/*.tar); [] if none."""
    folder = os.path.join(path, "test") if os.path.isdir(os.path.join(path, "test")) else path
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".tar"))


def tar_samples(urls, on_error):
    """Samples ({__key__, ext: bytes}) from WebDataset tars; a broken or truncated shard is reported (once) and
    what it held before the damage is kept."""
    from webdataset.gopen import gopen
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def handler(exn):
        on_error(f"shard: {exn}")
        return True

    current = []

    def streams():
        for url in urls:
            try:
                stream = _TarEnd(_open_shard(url, gopen))
            except Exception as exn:  # pylint: disable=broad-except
                on_error(f"shard {url}: {exn}")
                continue
            if current:  # the previous shard stopped at an error (already reported)
                current[1].close()  # (and what closing it says adds nothing)
            current[:] = [url, stream]
            yield {"url": url, "stream": stream}
        if current:  # the last shard stopped at an error
            current[1].close()

    def checked(files):
        for f in files:
            if not f and current:  # webdataset's end-of-shard marker: the shard's tar stream was read to its end
                url, stream = current
                problem, closing = stream.problem(), stream.close()
                problem = problem or closing
                current.clear()
                if problem:
                    on_error(f"shard {url}: {problem}")
            yield f

    yield from group_by_keys(checked(tar_file_expander(streams(), handler=handler)), handler=handler)


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    return table.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)


def load_manifest(root: str, columns=None) -> pd.DataFrame:
    """The whole manifest (manifest/ or a legacy manifest.parquet) as one frame; a missing or damaged one is a
    one-line error naming what to run."""
    layout = DatasetLayout(root)
    path = layout.manifest if storage.isdir(layout.manifest) else layout.legacy_manifest
    if not storage.exists(path):
        if Layout(root).ingest_ids():
            left, planned = unfinished_shards(Layout(root))
            raise InputError(f"{root}: incomplete build ({planned - left} of {planned} shard(s) downloaded, no "
                             f"manifest yet): rerun the same `psdclip data build` command")
        raise InputError(f"{root}: not a psdclip dataset (no manifest)")
    try:
        if path == layout.legacy_manifest:
            return read_parquet(path, columns=columns)
        import pyarrow.dataset as pads

        fs, p = storage.arrow_filesystem(path)
        # a dataset's additional input columns (text) when asked for by name
        schema = manifest_schema([c for c in columns or () if c not in MANIFEST_SCHEMA.names])
        return _to_pandas(pads.dataset(p, format="parquet", schema=schema, filesystem=fs).to_table(columns=columns))
    except (OSError, ValueError, pa.ArrowException) as err:
        raise damaged_manifest(path, err) from None


def damaged_manifest(path: str, err: BaseException) -> InputError:
    """The one line for a manifest file that cannot be read: which, why, what to run."""
    return InputError(f"{path}: damaged, not a Parquet table ({str(err).splitlines()[0][:160]}); rerun the "
                      f"`psdclip data build` command that made it")


def manifest_table(path: str, columns=None) -> pa.Table:
    """One manifest file (or columns of it); damaged: the one line of damaged_manifest."""
    try:
        return read_parquet_table(path, columns=columns)
    except (OSError, ValueError, pa.ArrowException) as err:
        raise damaged_manifest(path, err) from None


def shard_exclusions(root: str, shard: str) -> frozenset:
    """Keys a shard holds that are no training sample (duplicate_image: bytes kept, status not success), read from
    that shard's manifest file only. Empty for a legacy dataset (its readers use the success keys)."""
    number = shard_number(shard)
    if number is None:
        return frozenset()
    path = manifest_file(root, shard=number)
    if not storage.isfile(path):
        return frozenset()
    t = manifest_table(path, columns=["key", "status"])
    import pyarrow.compute as pc

    return frozenset(t.filter(pc.not_equal(t.column("status"), SUCCESS)).column("key").to_pylist())


def manifest_files(root: str) -> list[str]:
    """The manifest's Parquet files: manifest/'s, or a legacy manifest.parquet (one-line errors when missing or
    damaged)."""
    layout = DatasetLayout(root)
    if storage.isdir(layout.manifest):
        return sorted(J(layout.manifest, n) for n in storage.listdir(layout.manifest)
                      if n.endswith(".parquet") and not n.startswith((".", "_")))
    load_manifest(root, columns=[])  # the one-line errors of a missing or damaged manifest
    return [layout.legacy_manifest]


def manifest_batches(root: str, columns=None, batch_size: int = 262_144):
    """The manifest as frames of at most batch_size rows, one file at a time (manifest/ or a legacy
    manifest.parquet): what a reader of a 1B-row manifest holds at once."""
    for path in manifest_files(root):
        try:
            fs, p = storage.arrow_filesystem(path)
            pf = pq.ParquetFile(p, filesystem=fs)
            for batch in pf.iter_batches(columns=columns, batch_size=batch_size):
                yield _to_pandas(pa.Table.from_batches([batch]))
        except (OSError, pa.ArrowException) as err:
            raise damaged_manifest(path, err) from None


def success_rows(dataset: str, columns=("key", "url", "caption", "status", "shard", "offset", "size")
                 ) -> tuple[pd.DataFrame, str]:
    """(the successful rows of a dataset in (shard, offset) order, its shard format): what `index build` embeds
    (with the dataset's additional input columns, --save-additional-columns, after `columns`)."""
    info = read_info(dataset)
    fmt = shard_format(info)
    m = load_manifest(dataset, columns=list(columns) + [c for c in extra_columns(info) if c not in columns])
    ok = m[m["status"] == SUCCESS].sort_values(["shard", "offset"]).reset_index(drop=True)
    if ok.empty:
        raise InputError(f"--data {dataset}: no successful samples")
    ok["shard"] = ok["shard"].astype(int)
    return ok, fmt


def success_keys(root: str, shard: int) -> np.ndarray:
    """The keys of one shard's successful samples (its manifest file alone)."""
    t = manifest_table(manifest_file(root, shard=shard), columns=["key", "status"]).to_pandas()
    return np.asarray(t.loc[t["status"] == SUCCESS, "key"], dtype=object)


def shard_samples(root: str, fmt: str, shard: int, on_error):
    """The samples of one shard of a dataset."""
    return shard_format_impl(fmt).samples([DatasetLayout(root).shard_path(shard, fmt)], on_error)


def read_image_bytes(root: str, fmt: str, shard: int, offset: int, size: int) -> bytes:
    """One stored image, by its shard and offset (tars) or row (Arrow shards): the service's image endpoint."""
    return shard_format_impl(fmt).image_bytes(DatasetLayout(root).shard_path(shard, fmt), offset, size)
