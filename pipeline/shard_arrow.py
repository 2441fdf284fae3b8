"""The Arrow shard format (`--format arrow`): NNNNN.parquet, one row per successful sample (key, the image bytes in a
column named by its encode format: jpg, png or webp, caption, url, sizes, sha256), as img2dataset's parquet output
holds them. Its writer (for the downloader), its sample reader (a record batch at a time), its reorder pass and its
one-image read by row. Registered in format.py's SHARD_FORMATS."""
from __future__ import annotations

from functools import lru_cache

import pyarrow as pa
import pyarrow.parquet as pq

from ..core.io import read_parquet_table

from .format import IMAGE_FIELDS, ShardFormat

ROW_GROUP = 256
COLUMNS = ("url", "width", "height", "original_width", "original_height", "sha256")


def schema(ext: str) -> pa.Schema:
    return pa.schema([("key", pa.string()), (ext, pa.binary()), ("caption", pa.string()), ("url", pa.string()),
                      ("width", pa.int32()), ("height", pa.int32()), ("original_width", pa.int32()),
                      ("original_height", pa.int32()), ("sha256", pa.string())])


def image_column(names) -> str:
    """The column holding the images: the first of jpg, png, webp, jpeg the file has."""
    found = next((c for c in IMAGE_FIELDS if c in names), None)
    if found is None:
        raise ValueError(f"no image column (one of {', '.join(IMAGE_FIELDS)})")
    return found


class ArrowWriter:
    """Rows gathered, written as one Parquet file on close; `add` returns the image's row."""

    def __init__(self, path: str, ext: str):
        self.path, self.ext, self.rows = path, ext, []

    def add(self, key: str, image: bytes, caption: str, meta: dict) -> int:
        self.rows.append({"key": key, self.ext: image, "caption": caption, **{c: meta.get(c) for c in COLUMNS}})
        return len(self.rows) - 1

    def close(self) -> None:
        pq.write_table(pa.Table.from_pylist(self.rows, schema=schema(self.ext)), self.path, row_group_size=ROW_GROUP)


def reorder(path: str, order: list[str], out: str) -> dict[str, int]:
    """Write the file's rows in `order` to `out`; returns each image's new row."""
    table = pq.read_table(path)
    at = {k: i for i, k in enumerate(table.column("key").to_pylist())}
    pq.write_table(table.take(pa.array([at[k] for k in order], pa.int64())), out, row_group_size=ROW_GROUP)
    return {k: i for i, k in enumerate(order)}


def samples(urls, on_error):
    """Samples ({__key__, <image ext>, txt, __url__}) from Arrow/Parquet shards, a record batch at a time."""
    import fsspec

    for url in urls:
        try:
            with fsspec.open(url, "rb") as f:
                pf = pq.ParquetFile(f)
                ext = image_column(pf.schema_arrow.names)
                for batch in pf.iter_batches(columns=["key", ext, "caption"], batch_size=ROW_GROUP):
                    for key, img, cap in zip(*(batch.column(i).to_pylist() for i in range(3))):
                        yield {"__key__": key, ext: img, "txt": (cap or "").encode(), "__url__": url}
        except Exception as err:  # pylint: disable=broad-except  (the loader's handler decides: skip or raise)
            on_error(f"shard {url}: {err}")


def image_bytes(path: str, offset: int, size: int) -> bytes:
    """One stored image: row `offset` of the file."""
    table = _table(path)
    return table.column(image_column(table.column_names))[offset].as_py()


@lru_cache(maxsize=4)
def _table(path):
    return read_parquet_table(path)


FORMAT = ShardFormat(name="arrow", extension="parquet", writer=ArrowWriter, samples=samples, reorder=reorder,
                     image_bytes=image_bytes)
