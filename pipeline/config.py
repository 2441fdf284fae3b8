"""Typed configs of the pipeline stage: one dataclass per command, a help text per field,
validation in ``__post_init__``. The CLI (psdclip.workflows.cli) is generated from these types."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from ..core.errors import InputError
from ..core.names import check_name
from ..core.options import option as _help

INPUT_FORMATS = ("txt", "csv", "tsv", "parquet", "jsonl")
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
# img2dataset's own default opt-out directives (X-Robots-Tag), kept as they are.
DEFAULT_DISALLOWED = ("noai", "noimageai", "noindex", "noimageindex")


@dataclass
class BuildConfig:
    """psdclip data build: URL lists -> sharded dataset (WebDataset or Arrow) + manifest + subsets."""

    inputs: list[str] = _help("URL list files (txt/csv/tsv/parquet/jsonl, optionally .gz; local or fsspec paths)",
                              default_factory=list, meta={"positional": True, "metavar": "URL_LIST"})
    out: str = _help("output dataset directory (created, resumed or appended to); a local path or an fsspec URL "
                     "(s3://bucket/prefix: workers need no shared mount)", default="")
    input_format: Optional[str] = _help("input format; default: from each file's ending", default=None)
    url_col: str = _help("column holding the image URL", default="url")
    caption_col: str = _help("column holding the caption", default="caption")
    column_names: list[str] = _help("for csv/tsv lists without a header row (CC3M, CC12M): their column names, "
                                    "e.g. caption,url", default_factory=list)
    format: Literal["webdataset", "arrow"] = _help("shard format: WebDataset tars or Arrow/Parquet", default="webdataset")
    image_size: int = _help("img2dataset image_size: target side in pixels", default=256)
    resize_mode: str = _help("img2dataset resize_mode: no|border|keep_ratio|keep_ratio_largest|center_crop", default="border")
    encode_format: Literal["jpg", "png", "webp"] = _help("image encoding inside the shards", default="jpg")
    encode_quality: Optional[int] = _help("encoding quality: jpg and webp 0-100 (default 95), png compression 0-9 "
                                          "(default 3)", default=None)
    timeout: float = _help("per-request socket timeout in seconds (img2dataset's --timeout: each connect and read)",
                           default=10.0)
    request_timeout: float = _help("wall-clock limit of one URL's whole response in seconds: a host that trickles "
                                   "bytes ends the row 'timeout' then", default=60.0)
    retries: int = _help("download retries per URL", default=0)
    host_rate: float = _help("most requests per second to any one host, over the whole build (0: no cap)", default=0.0)
    rate_limit_retries: int = _help("retries of a URL answered 429 or 503, each after the host's Retry-After or an "
                                    "exponential back-off; then the row is rate_limited/http_5xx (transient)", default=3)
    backoff: float = _help("first back-off in seconds after a 429/503 without Retry-After (doubles each time)",
                           default=1.0)
    max_backoff: float = _help("longest pause a build waits for a host (Retry-After or back-off); past it the row "
                               "ends rate_limited and --retry-failed takes it later", default=60.0)
    shard_timeout: float = _help("wall-clock limit of one shard's download in seconds: rows unfinished by then end "
                                 "'timeout' (transient: --retry-failed takes them)", default=3600.0)
    stall_timeout: float = _help("seconds a build waits while no download task writes a row or finishes: then the "
                                 "worker processes holding the stuck shards are restarted and those shards retried, "
                                 "once (a LocalCluster), or the build stops with one line (--dask-scheduler; and a "
                                 "shard stuck twice); 0: wait for ever", default=600.0)
    thread_count: int = _help("download threads per partition (img2dataset thread_count)", default=64)
    processes_count: int = _help("Dask worker processes of the LocalCluster (not with --dask-scheduler: that cluster "
                                 "has its own workers)", default=2)
    shard_size: int = _help("rows per partition, i.e. per output shard (img2dataset number_sample_per_shard)", default=10000)
    max_caption_length: int = _help("captions longer than this many characters are dropped (caption_too_long)", default=1024)
    max_image_area: int = _help("images declaring more pixels than this are refused before decoding (decompression bombs)",
                                default=89_478_485)
    max_image_bytes: int = _help("a response (or local file) larger than this many bytes is not read on: the row ends "
                                 "image_too_large (a 24-megapixel JPEG is ~10 MB; the cap bounds what each download "
                                 "thread holds)", default=50 * 1024 * 1024)
    disallowed_header_directives: list[str] = _help(
        "X-Robots-Tag directives that opt an image out (img2dataset's defaults); empty to disable",
        default_factory=lambda: list(DEFAULT_DISALLOWED))
    user_agent_token: Optional[str] = _help(
        "token added to the User-Agent (img2dataset's flag), matched against X-Robots-Tag and robots.txt rules",
        default=None)
    user_agent: Optional[str] = _help("the whole User-Agent header instead of psdclip's own (psdclip/VERSION "
                                      "(+https://pypi.org/project/psdclip/), with the token when given)", default=None)
    ignore_robots_txt: bool = _help("do not fetch or honour the hosts' robots.txt (by default each worker reads a "
                                    "host's robots.txt once per build; disallowed rows end robots_disallowed)",
                                    default=False)
    dask_scheduler: Optional[str] = _help("address of a running Dask scheduler (tcp://HOST:PORT); default: a LocalCluster",
                                          default=None)
    save_additional_columns: list[str] = _help(
        "input columns to keep with each sample (img2dataset's --save_additional_columns): in its .json, the manifest, "
        "the index metadata and the service's answers, as text (null where an input file has no such column)",
        default_factory=list)
    local_root: str = _help("read local images: list rows whose url is a path or a file:// URL are resolved inside "
                            "this folder (a path, '..' or symlink leading out of it ends the row invalid_url; nothing "
                            "outside it is read); an input that is a folder is walked for images with sidecar "
                            "captions. Without it a local path stays invalid_url", default="")
    subsets: list[str] = _help("nested subsets to write, as fractions (<=1) or absolute counts, e.g. 0.01,0.1,1.0",
                               default_factory=list)
    subset_seed: int = _help("seed of the subset order", default=0)
    retry_failed: bool = _help("download again the rows whose status was transient (timeout, 5xx, connection errors)",
                               default=False)
    progress: bool = _help("show progress bars", default=True)

    def __post_init__(self):
        if not self.out:
            raise InputError("--out: an output dataset directory is required")
        if self.input_format is not None and self.input_format not in INPUT_FORMATS:
            raise InputError(f"--input-format {self.input_format!r}: expected one of {', '.join(INPUT_FORMATS)}")
        if self.format not in ("webdataset", "arrow"):
            raise InputError(f"--format {self.format!r}: expected webdataset or arrow")
        if self.resize_mode not in RESIZE_MODES:
            raise InputError(f"--resize-mode {self.resize_mode!r}: expected one of {', '.join(RESIZE_MODES)}")
        if self.encode_format not in ("jpg", "png", "webp"):
            raise InputError(f"--encode-format {self.encode_format!r}: expected jpg, png or webp")
        top = 9 if self.encode_format == "png" else 100
        if self.encode_quality is None:
            self.encode_quality = 3 if self.encode_format == "png" else 95
        if isinstance(self.encode_quality, bool) or not 0 <= self.encode_quality <= top:
            raise InputError(f"--encode-quality {self.encode_quality}: must be in [0, {top}] for --encode-format "
                             f"{self.encode_format} ({'png compression' if top == 9 else 'quality'})")
        for name, top in (("image_size", 16384), ("thread_count", 4096), ("processes_count", 1024)):
            if getattr(self, name) > top:  # (a million threads or processes is a crash or a hang, not a build)
                raise InputError(f"--{name.replace('_', '-')} {getattr(self, name)}: at most {top}")
        for name in ("image_size", "thread_count", "processes_count", "shard_size", "max_caption_length", "max_image_area",
                     "max_image_bytes"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.timeout <= 0:
            raise InputError(f"--timeout must be > 0, got {self.timeout}")
        if not self.request_timeout > 0:
            raise InputError(f"--request-timeout must be > 0 seconds, got {self.request_timeout}")
        for name in ("retries", "rate_limit_retries", "host_rate", "backoff", "max_backoff"):
            if getattr(self, name) < 0:
                raise InputError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not self.stall_timeout >= 0:
            raise InputError(f"--stall-timeout must be >= 0 seconds (0: no limit), got {self.stall_timeout}")
        if not self.shard_timeout > 0:
            raise InputError(f"--shard-timeout must be > 0 seconds, got {self.shard_timeout}")
        from .format import MANIFEST_COLUMNS

        taken = set(MANIFEST_COLUMNS) | {"host", "file", "row", "ukey", "part", "psdclip_key", "order", "id", "score",
                                         "rank", "similarity", "json", "txt", "jpg", "exif", "status_dict",
                                         self.url_col, self.caption_col}
        clash = [c for c in self.save_additional_columns if c in taken]
        if clash:
            raise InputError(f"--save-additional-columns {','.join(clash)}: the name of a column psdclip writes "
                             f"itself (key, url, caption, status, width, ...); rename it in the input")
        self.subset_sizes()  # validates

    def subset_sizes(self) -> list[tuple[str, float]]:
        """(name, size) for each requested subset: size <= 1 is a fraction, > 1 an absolute count."""
        from .subsets import parse_subsets

        return parse_subsets(self.subsets)


@dataclass
class SynthConfig:
    """psdclip data synth: a procedural, deterministic image-caption source with web-like noise."""

    out: str = _help("output directory for images, captions, attributes and URL lists", default="")
    n: int = _help("number of training image-caption pairs", default=2000)
    seed: int = _help("random seed; the same seed gives the same images and captions", default=0)
    image_size: int = _help("side of the rendered images in pixels", default=96)
    mismatch_frac: float = _help("fraction of captions taken from another scene (wrong captions)", default=0.2)
    shared_frac: float = _help("fraction of images given a generic caption that many images share", default=0.1)
    lowinfo_frac: float = _help("fraction of low-information captions ('image', 'IMG_1234.jpg', ...)", default=0.05)
    partial_frac: float = _help("fraction of (otherwise correct) captions that describe only part of the scene",
                                default=0.3)
    distractor_frac: float = _help("difficulty: fraction of scenes with a small distractor shape of another kind and "
                                   "colour (0: none)", default=0.4)
    shape_scale: float = _help("difficulty: size of the shapes relative to the default (above 1 they are easier to "
                               "tell apart at low resolution; multi-shape scenes may overlap more)", default=1.0)
    backgrounds: int = _help("difficulty: how many of the 4 backgrounds (white, grey, black, beige) scenes use; with "
                             "fewer, captions are told apart less by background and more by shape", default=4)
    positions: int = _help("difficulty: how many of the 5 positions scenes use (center first, then left, right, top, "
                           "bottom)", default=5)
    max_count: int = _help("difficulty: most shapes in a scene (1-3; several small shapes of one kind may overlap)",
                           default=3)
    heldout: int = _help("held-out scenes rendered for evaluation, each also in every shifted variant", default=500)
    base_url: str = _help("base URL written into urls.csv (the address `psdclip data serve` listens on)",
                          default="http://127.0.0.1:8765")

    def __post_init__(self):
        if not self.out:
            raise InputError("--out: an output directory is required")
        if self.n < 1 or self.heldout < 0:
            raise InputError(f"--n must be >= 1 and --heldout >= 0 (got {self.n}, {self.heldout})")
        if not 16 <= self.image_size <= 1024:
            raise InputError(f"--image-size must be in [16, 1024], got {self.image_size}")
        if not 1 <= self.max_count <= 3:
            raise InputError(f"--max-count must be in [1, 3], got {self.max_count}")
        if not 1 <= self.backgrounds <= 4 or not 1 <= self.positions <= 5:
            raise InputError(f"--backgrounds must be in [1, 4] and --positions in [1, 5] (got {self.backgrounds}, "
                             f"{self.positions})")
        if not 0.25 <= self.shape_scale <= 2.0:
            raise InputError(f"--shape-scale must be in [0.25, 2], got {self.shape_scale}")
        for name in ("mismatch_frac", "shared_frac", "lowinfo_frac", "partial_frac", "distractor_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if self.mismatch_frac + self.shared_frac + self.lowinfo_frac > 1.0:
            raise InputError("--mismatch-frac + --shared-frac + --lowinfo-frac must not exceed 1")


@dataclass
class ServeDataConfig:
    """psdclip data serve: serve a synthetic source over HTTP on a loopback address."""

    dir: str = _help("directory written by `psdclip data synth`", default="", meta={"positional": True})
    host: str = _help("address to listen on (loopback by default)", default="127.0.0.1")
    port: int = _help("port to listen on (0 picks a free one)", default=8765)

    def __post_init__(self):
        if not self.dir:
            raise InputError("DIR: the synthetic source directory is required")
        if not 0 <= self.port <= 65535:
            raise InputError(f"--port must be in [0, 65535], got {self.port}")


@dataclass
class StatsConfig:
    """psdclip data stats: counts per status, success rate, sizes, bytes, failing shards."""

    dataset: str = _help("dataset directory", default="", meta={"positional": True})
    json: bool = _help("print JSON instead of a table", default=False)

    def __post_init__(self):
        if not self.dataset:
            raise InputError("DATASET: a dataset directory is required")


@dataclass
class OracleConfig:
    """psdclip data oracle: the ground-truth groups of a dataset's samples (for `psdclip train --oracle-targets`)."""

    dataset: str = _help("dataset directory built from a synthetic or emoji source", default="",
                         meta={"positional": True})
    source: str = _help("the source folder it was built from (its attributes.parquet holds the truth)", default="")
    out: str = _help("output Parquet file (key, image_group, text_group)", default="")
    by: list[str] = _help("synthetic source: the scene attributes that make a group (what a caption must name to "
                          "fit an image)", default_factory=lambda: ["shape", "colour"])

    def __post_init__(self):
        if not self.dataset or not self.source or not self.out:
            raise InputError("usage: psdclip data oracle DATASET --source SOURCE_DIR --out FILE.parquet")


EMOJI_VENDORS = ("apple", "google", "twitter", "facebook")


@dataclass
class EmojiConfig:
    """psdclip data emoji: a real-image source: Unicode emoji as several vendors draw them (the npm registry's
    emoji-datasource-<vendor> packages, 64 px), captioned from emojibase-data's CLDR English labels and tags with
    web-like noise; fetched with `npm pack` at pinned versions and checksums (nothing is committed: the artwork has
    licences of its own)."""

    out: str = _help("output directory for images, captions, attributes, evaluation lists and URL lists", default="")
    train_vendors: list[str] = _help("vendors whose drawings are trained on", default_factory=lambda: ["apple", "google"])
    test_vendor: str = _help("a vendor never trained on: the style-shifted evaluation set", default="twitter")
    heldout_frac: float = _help("fraction of emoji held out of training in one training vendor's drawing (the "
                                "in-distribution evaluation set; the other training vendors' drawings of them are "
                                "trained on)", default=0.25)
    mismatch_frac: float = _help("fraction of captions taken from another emoji (wrong captions)", default=0.2)
    generic_frac: float = _help("fraction of generic captions ('emoji', 'icon png', ...) that name nothing",
                                default=0.1)
    partial_frac: float = _help("fraction of the other captions that give only part of the label or its tags",
                                default=0.3)
    seed: int = _help("random seed of the split and the captions", default=0)
    cache: str = _help("where the fetched packages are kept (default: OUT/packages)", default="")
    npm: str = _help("the npm client", default="npm")
    base_url: str = _help("base URL written into urls.csv", default="http://127.0.0.1:8765")

    def __post_init__(self):
        if not self.out:
            raise InputError("--out: an output directory is required")
        vendors = [*self.train_vendors, self.test_vendor]
        unknown = [v for v in vendors if v not in EMOJI_VENDORS]
        if unknown or not self.train_vendors:
            raise InputError(f"--train-vendors / --test-vendor: expected vendors among {', '.join(EMOJI_VENDORS)}, got "
                             f"{', '.join(unknown) or 'no training vendor'}")
        if self.test_vendor in self.train_vendors:
            raise InputError(f"--test-vendor {self.test_vendor} is also a training vendor: it must be one never "
                             f"trained on")
        for name in ("heldout_frac", "mismatch_frac", "generic_frac", "partial_frac"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise InputError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if self.mismatch_frac + self.generic_frac >= 1.0:
            raise InputError("--mismatch-frac + --generic-frac must be < 1")


@dataclass
class ImportConfig:
    """psdclip data import: an img2dataset output folder becomes a psdclip dataset (no download)."""

    folder: str = _help("img2dataset's output folder (webdataset or parquet output)", default="",
                        meta={"positional": True, "metavar": "I2D_FOLDER"})
    out: str = _help("the new dataset directory", default="")
    copy: bool = _help("copy the tar shards (default: hard-link them when on the same file system)", default=False)
    subsets: list[str] = _help("nested subsets to write, as fractions (<=1) or absolute counts, e.g. 0.01,0.1,1.0",
                               default_factory=list)
    subset_seed: int = _help("seed of the subset order", default=0)

    def __post_init__(self):
        if not self.folder or not self.out:
            raise InputError("usage: psdclip data import I2D_FOLDER --out DATASET")
        if self.subsets:
            from .subsets import parse_subsets

            parse_subsets(self.subsets)


@dataclass
class ScoreConfig:
    """psdclip data score: each successful sample's image-caption similarity under a checkpoint, per shard."""

    dataset: str = _help("dataset directory", default="", meta={"positional": True})
    checkpoint: str = _help("a psdclip run or checkpoint, or an export (open_clip checkpoint) of a known model",
                            default="")
    name: str = _help("the scores' name: DATASET/scores/NAME/ (default: from the checkpoint)", default="")
    embeddings: str = _help("take the vectors from these embedding parts (an index's OUT/embeddings, built with the "
                            "same checkpoint on this dataset) instead of encoding again", default="")
    near_duplicates: bool = _help("also each sample's nearest other image in the dataset: nn_similarity (cosine of "
                                  "the image embeddings, exact) and nn_key", default=False)
    batch_size: int = _help("images per forward pass", default=256)
    workers: int = _help("image loading worker processes (each reads whole shards)", default=2)
    device: str = _help("auto, cpu or cuda[:N]", default="auto")
    skip_damaged: bool = _help("score what a damaged shard still holds instead of exit 1 (see index build's "
                               "--skip-damaged)", default=False)
    progress: bool = _help("show a progress bar", default=True)

    def __post_init__(self):
        if not self.dataset or not self.checkpoint:
            raise InputError("usage: psdclip data score DATASET --checkpoint RUN_OR_CHECKPOINT")
        if self.batch_size < 1 or self.workers < 0:
            raise InputError("--batch-size must be >= 1 and --workers >= 0")
        if self.name:
            check_name("--name", self.name)


@dataclass
class SubsetConfig:
    """psdclip data subset: a subset of a dataset by a score threshold (no key list, no copy)."""

    dataset: str = _help("dataset directory", default="", meta={"positional": True})
    name: str = _help("the subset's name: DATASET/subsets/NAME.json", default="")
    score: str = _help("the scores to threshold (DATASET/scores/NAME, from `psdclip data score`)", default="")
    column: str = _help("the score column", default="clip_score")
    min_score: Optional[float] = _help("keep the samples scoring at least this", default=None)
    top_fraction: Optional[float] = _help("keep this fraction of the samples with the highest scores (the threshold "
                                          "from a histogram of the score files, within 1e-4 of the exact quantile)",
                                          default=None)
    max_score: Optional[float] = _help("keep the samples scoring at most this (a dedupe: --column nn_similarity "
                                       "--max-score 0.95 keeps the samples whose nearest other image is further)",
                                       default=None)
    within: str = _help("apply the threshold inside this subset (e.g. 10pct of --subsets) rather than the whole "
                        "dataset", default="")
    exclude_near: str = _help("leave out copies of this evaluation set's images (an image folder, a retrieval CSV/JSONL, "
                              "a synthetic source or CLIP_benchmark's wds_* folder of test/*.tar): exact (sha256) or near (perceptual hash within --max-hamming "
                              "bits, mirror images included); counted by reason", default="")
    max_hamming: int = _help("near-copy threshold in bits of the 64-bit perceptual hash (resized and re-encoded "
                             "copies measured here at 0-2 bits, unrelated images at ~32)", default=8)
    force: bool = _help("replace an existing subset of that name", default=False)

    def __post_init__(self):
        if not self.dataset or not self.name or not (self.score or self.exclude_near):
            raise InputError("usage: psdclip data subset DATASET --name NAME [--score SCORES (--min-score S | "
                             "--top-fraction F | --max-score S)] [--exclude-near EVAL]")
        asked = [v is not None for v in (self.min_score, self.top_fraction, self.max_score)]
        if self.score and sum(asked) != 1:
            raise InputError("--score: give one of --min-score, --top-fraction and --max-score")
        if not self.score and any(asked):
            raise InputError("--min-score, --top-fraction and --max-score threshold a --score")
        if not 0 <= self.max_hamming <= 64:
            raise InputError(f"--max-hamming must be in [0, 64], got {self.max_hamming}")
        if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
            raise InputError(f"--top-fraction must be in (0, 1], got {self.top_fraction}")
        check_name("--name", self.name)
