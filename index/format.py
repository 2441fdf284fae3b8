"""The index format: INDEX/index.json as a typed `IndexInfo`, written and read here alone (build writes it; the
searcher, the service, its launcher and `index query` read it). The file itself is plain JSON, readable without our
code:

    schema_version            2
    checkpoint                the model checkpoint's absolute path (null: built from --embeddings alone)
    checkpoint_sha256         its digest; checkpoint_relative: the same file relative to the index folder
    model_arch, step          the model's architecture and training step
    dataset, dataset_format   the dataset the vectors were made from (a folder or an fsspec URL) and its shard format
    dataset_id                its id (dataset.json's): a dataset rebuilt in place has another, and its images are not
                              served from this index's offsets
    dataset_shards            {shard file: [size, mtime_ns]} at build (a local dataset): a shard replaced since is
                              not read at this index's offsets
    embeddings                the parts' folder (clip-retrieval's layout); embeddings_relative: from the index folder
    count, dim, metric        vectors, their dimension, inner product (cosine on normalised vectors)
    factory, why              the faiss factory string and why it was chosen
    budgets                   --max-memory, --max-build-memory, --max-query-ms
    files, layout             {index.faiss | captions.faiss: [file, ...]} (one file, or IVF shards) and in words
    search_params             {name: {param, value[, k_factor]}} set on every open
    recall_at_k               {name: {k, recall, ms_per_query}} measured against exact search at build
    embeddings_dtype, embed_s, index_build_s, undecodable_images
    budget_missed             only when a budget was missed: {name: {message, ...}}

Fields a newer psdclip adds are kept through a read and a write (`extra`)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from ..core.errors import InputError
from ..core.io import read_json, sha256_file, write_json

INFO = "index.json"
SCHEMA_VERSION = 2
# an index built before index.json named its files
DEFAULT_FILES = {"index.faiss": ["index.faiss"], "captions.faiss": ["captions.faiss"]}


@dataclass
class IndexInfo:
    """INDEX/index.json (see the module's docstring for each field)."""
    count: int
    dim: int
    factory: str
    files: dict = field(default_factory=lambda: dict(DEFAULT_FILES))
    search_params: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    checkpoint_relative: str | None = None
    embeddings_relative: str | None = None
    model_arch: str | None = None
    step: int | None = None
    dataset: str | None = None
    dataset_id: str | None = None
    dataset_shards: dict | None = None
    dataset_format: str | None = None
    embeddings: str | None = None
    metric: str = "inner_product (cosine on normalised vectors)"
    why: str = ""
    budgets: dict = field(default_factory=dict)
    layout: dict = field(default_factory=dict)
    recall_at_k: dict = field(default_factory=dict)
    embeddings_dtype: str | None = None
    embed_s: float | None = None
    index_build_s: float | None = None
    undecodable_images: int = 0
    budget_missed: dict | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, doc: dict) -> "IndexInfo":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in doc.items() if k in names}
        for key in ("count", "dim", "factory"):
            if key not in known:
                raise InputError(f"index.json has no {key!r}: not a psdclip index, or a damaged one")
        if not known.get("files"):
            known["files"] = dict(DEFAULT_FILES)
        return cls(**known, extra={k: v for k, v in doc.items() if k not in names})

    def to_dict(self) -> dict:
        doc = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if doc["budget_missed"] is None:
            del doc["budget_missed"]
        return {**doc, **self.extra}

    def write(self, index_dir: str) -> None:
        write_json(os.path.join(index_dir, INFO), self.to_dict())

    @classmethod
    def read(cls, index_dir: str, locate: bool = True) -> "IndexInfo":
        """INDEX/index.json; `locate`: with its checkpoint and embeddings paths as they are now (see `located`)."""
        path = os.path.join(index_dir, INFO)
        if not os.path.isfile(path):
            raise InputError(f"{index_dir}: not a psdclip index (no index.json)")
        info = cls.from_dict(read_json(path))
        return info.located(index_dir) if locate else info

    def located(self, index_dir: str) -> "IndexInfo":
        """A copy with its checkpoint and embeddings paths as they are now: the absolute path it records when that
        exists, else the same path relative to the index folder (an index moved with what it names), else as
        recorded (indices built before: relative to the directory the build ran in, tried from the index folder
        too). A checkpoint found elsewhere than recorded must have the recorded sha256."""
        out = dataclasses.replace(self)
        for key in ("checkpoint", "embeddings"):
            recorded, relative = getattr(self, key), getattr(self, f"{key}_relative")
            if not recorded or os.path.exists(recorded):
                continue
            for candidate in (relative, recorded if not os.path.isabs(recorded) else None):
                path = os.path.join(index_dir, candidate) if candidate else None
                if path and os.path.exists(path) and (key != "checkpoint" or self.same_checkpoint(path)):
                    setattr(out, key, os.path.normpath(path))
                    break
        return out

    def same_checkpoint(self, path: str) -> bool:
        """Whether the checkpoint file at `path` is the one the index was built with (its sha256, when recorded)."""
        return not self.checkpoint_sha256 or sha256_file(path) == self.checkpoint_sha256

    def check_checkpoint(self, index_dir: str) -> str:
        """The model checkpoint to load, checked at every open: it must be there and be the file the index was built
        with (its sha256), else one line saying what to do. Returns its path."""
        path = self.checkpoint
        if not path or not os.path.exists(path):
            raise InputError(f"{index_dir}: the model checkpoint its index.json names, {path}, is missing (text and "
                             f"image queries need it: restore it, or rebuild the index)")
        if not self.same_checkpoint(path):
            raise InputError(f"{index_dir}: the model checkpoint at {path} is not the one the index was built with "
                             f"(its sha256 differs from index.json's {str(self.checkpoint_sha256)[:12]}...): the "
                             f"vectors would not match the queries; restore that checkpoint or rebuild the index")
        return path

    def same_model(self, other: "IndexInfo") -> bool:
        """Both indices name the same checkpoint file with the same contents."""
        return self.checkpoint == other.checkpoint and self.checkpoint_sha256 == other.checkpoint_sha256

