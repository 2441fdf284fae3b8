"""The dataset format's public layout: what a dataset directory holds and where (the contract between the pipeline,
which writes it, and the trainer and index, which read it through reader.py).

    DATASET/
      dataset.json        schema version, config used, created-at, counts, output format, shards with samples
      manifest/           shard-NNNNN.parquet (the rows planned into that shard), ingest-NNNNN[-JJJJ].parquet (rows that
                          reached no shard): one partitioned Parquet table, MANIFEST_SCHEMA
      manifest.parquet    the one manifest file of datasets written before manifest/ (still read)
      shards/NNNNN.tar    WebDataset (<key>.jpg, <key>.txt, <key>.json) or shards/NNNNN.parquet (Arrow: key, jpg, caption)
      subsets/NAME.json   nested subsets: shard lists plus a per-key rule (subsets.SubsetRule)
      stats.json          per status counts, image sizes, timings

Nothing here writes: the pipeline's build state (ingests, plans, results) lives in dataset.py beside it.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import pyarrow as pa

from ..core import storage
from ..core.errors import InputError
from ..core.io import read_json

SCHEMA_VERSION = 2  # 2: manifest/ (a file per shard) and subsets as shard lists plus a rank rule
MANIFEST_COLUMNS = ["key", "url", "caption", "status", "error", "shard", "offset", "size", "width", "height",
                    "original_width", "original_height", "sha256", "source", "source_row", "ingest"]
_INT_COLUMNS = ("shard", "offset", "size", "width", "height", "original_width", "original_height", "source_row",
                "ingest")
MANIFEST_SCHEMA = pa.schema([(c, pa.int64() if c in _INT_COLUMNS else pa.string()) for c in MANIFEST_COLUMNS])


def manifest_schema(extra=()) -> pa.Schema:
    """The manifest's schema, with a dataset's additional input columns (--save-additional-columns: text, null
    where an input had none) after the standard ones."""
    return pa.schema(list(MANIFEST_SCHEMA) + [(c, pa.string()) for c in extra if c not in MANIFEST_SCHEMA.names])


def extra_columns(info: dict) -> list[str]:
    """The additional input columns a dataset keeps (dataset.json's config.save_additional_columns)."""
    return list((info.get("config") or {}).get("save_additional_columns") or [])


SCORE_COLUMN = "clip_score"  # DATASET/scores/NAME/shard-NNNNN.parquet: key, clip_score (`psdclip data score`)


def score_folder(dataset: str, name: str) -> str:
    """DATASET/scores/NAME/: score.json and a Parquet file of per-sample scores per shard (pipeline/scores.py reads
    them, index/score.py writes them)."""
    return J(storage.resolve(dataset), "scores", name)


IMAGE_FIELDS = ("jpg", "png", "webp", "jpeg")  # a sample's image, by the extension it was stored under
# the shard formats: name -> (its module in this package, its file extension). A format is one module defining
# FORMAT = ShardFormat(...) (its writer, sample reader, reorder pass and one-image read) plus its line here.
SHARD_FORMATS = {"webdataset": ("shard_tar", "tar"), "arrow": ("shard_arrow", "parquet")}
FORMATS = tuple(SHARD_FORMATS)

J = storage.join


@dataclasses.dataclass(frozen=True)
class ShardFormat:
    """One shard format (shard_tar.py, shard_arrow.py): what writes, reads and reorders its files.
    writer(path, ext): .add(key, image, caption, meta) -> the image's offset (a byte offset, or a row), .close();
    samples(urls, on_error): the shards' samples ({__key__, <image ext>, txt, ...}) front to back;
    reorder(path, keys in order, out) -> {key: new offset}; image_bytes(path, offset, size): one stored image."""
    name: str
    extension: str
    writer: Callable
    samples: Callable
    reorder: Callable
    image_bytes: Callable


def shard_format_impl(fmt: str) -> ShardFormat:
    """The ShardFormat of a format name (its module imported on first use)."""
    if fmt not in SHARD_FORMATS:
        raise InputError(f"shard format {fmt!r}: expected one of {', '.join(SHARD_FORMATS)}")
    return importlib.import_module(f"{__package__}.{SHARD_FORMATS[fmt][0]}").FORMAT


def shard_extension(fmt: str) -> str:
    """The file extension of a shard format's shards (tar, parquet)."""
    return SHARD_FORMATS[fmt][1]


def shard_format_of_files(names) -> str:
    """The shard format of a list of shard files or URLs, by their extension (webdataset unless all are another's)."""
    return next((f for f, (_, ext) in SHARD_FORMATS.items() if names and all(n.endswith("." + ext) for n in names)),
                "webdataset")


def shard_name(shard: int, fmt: str) -> str:
    """A shard's file name: NNNNN.tar (webdataset) or NNNNN.parquet (arrow)."""
    return f"{int(shard):05d}.{shard_extension(fmt)}"


def stats_name(shard: int) -> str:
    """img2dataset's per-shard statistics file, NNNNN_stats.json (its keys: count, successes, failed_to_download,
    failed_to_resize, duration, start_time, end_time, status_dict), kept beside the shard so that tools written
    for img2dataset output read ours."""
    return f"{int(shard):05d}_stats.json"


def shard_number(name: str) -> int | None:
    """The shard number of a shard's file name or path (None for a name that is not one of ours)."""
    stem = str(name).rsplit("/", 1)[-1].split(".")[0]
    return int(stem) if stem.isdigit() else None


def image_of(sample: dict):
    """A sample's image bytes, whichever extension it was stored under (None if it holds no image)."""
    for field in IMAGE_FIELDS:
        if sample.get(field):
            return sample[field]
    return None


class DatasetLayout:
    """The public paths of a dataset directory (a local folder or an fsspec URL)."""

    def __init__(self, root: str):
        self.root = storage.resolve(root)
        self.shards = J(self.root, "shards")
        self.subsets = J(self.root, "subsets")
        self.manifest = J(self.root, "manifest")  # a partitioned Parquet dataset
        self.legacy_manifest = J(self.root, "manifest.parquet")  # datasets written before it
        self.dataset_json = J(self.root, "dataset.json")
        self.stats_json = J(self.root, "stats.json")

    def shard_name(self, shard: int, fmt: str) -> str:
        return shard_name(shard, fmt)

    def shard_path(self, shard: int, fmt: str) -> str:
        return J(self.shards, shard_name(shard, fmt))

    def manifest_file(self, shard: int | None = None, ingest: int | None = None) -> str:
        return manifest_file(self.root, shard=shard, ingest=ingest)

    def has_manifest(self) -> bool:
        return storage.isdir(self.manifest) or storage.isfile(self.legacy_manifest)


def manifest_file(root: str, shard: int | None = None, ingest: int | None = None) -> str:
    """manifest/shard-NNNNN.parquet holds the rows whose (latest) plan put them in that shard;
    manifest/ingest-NNNNN.parquet the rows of that ingest that never reached a shard (filtered, duplicate URLs)."""
    name = f"shard-{shard:05d}.parquet" if shard is not None else f"ingest-{ingest:05d}.parquet"
    return J(storage.resolve(root), "manifest", name)


def read_info(root: str, what: str = "--data") -> dict:
    """A dataset's dataset.json (one-line errors: `what` names the option or input that gave the folder)."""
    layout = DatasetLayout(root)
    if not storage.isfile(layout.dataset_json) or not layout.has_manifest():
        raise InputError(f"{what} {root}: not a psdclip dataset (no dataset.json / manifest); "
                         f"build one with `psdclip data build`")
    try:
        info = read_json(layout.dataset_json)
    except OSError as err:
        raise InputError(f"{layout.dataset_json}: cannot read ({err})") from None
    if not isinstance(info, dict):
        raise InputError(f"{layout.dataset_json}: damaged (not a JSON object)")
    return info


def shard_format(info: dict) -> str:
    """The shard format a dataset.json names (webdataset for datasets that predate the field)."""
    return info.get("output_format", "webdataset")


def dataset_id(info: dict) -> str:
    """A dataset's id (dataset.json's `id`, made at its first build and kept by every later one; a copied folder keeps
    it, a rebuilt one gets a new one): what subsets and embedding parts name to say which dataset they belong to.
    Datasets written before ids get one derived from their creation time."""
    if info.get("id"):
        return str(info["id"])
    import hashlib

    return hashlib.sha1(f"{info.get('created_at', '')}".encode()).hexdigest()[:16]

