"""Download one partition with img2dataset, on a Dask worker, and publish it as one shard.

Dask plays the part of img2dataset's distributor (as its pyspark and ray distributors do): each task
builds img2dataset's Resizer and Downloader and downloads one shard with its thread pool, into a private
work folder (the worker's temporary folder when the dataset is on an object store), through a sample writer
of ours that names samples by our stable keys and records where each image lies. The finished shard is
renamed (or uploaded whole) into shards/, so a reader never sees a partial shard and a rerun simply redoes a
shard whose result was not recorded.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import time
import uuid

import numpy as np
import pandas as pd
import pyarrow as pa

from ..core import storage
from ..core.errors import DiskFullError, disk_full, is_disk_full
from ..core.io import atomic_path, write_text
from .format import shard_format_impl, shard_name, stats_name
from .polite import ShardPolicy, install
from .read import EXTRA
from .robots import DISALLOWED, UNREACHABLE
from .status import SUCCESS

RESULT_COLUMNS = ["key", "status", "error", "width", "height", "original_width", "original_height", "sha256",
                  "offset", "size"]

_HTTP_CODE = re.compile(r"HTTP Error (\d{3})")


# a local file's failure (core.local.read's first words) -> its status
LOCAL_KINDS = (("file not found", "file_not_found"), ("permission denied", "file_unreadable"),
               ("file cannot be", "file_unreadable"), ("not a regular file", "not_a_file"),
               ("outside --local-root", "invalid_url"), ("file too large", "image_too_large"))


def classify(stage: str, message: str | None) -> str:
    """Map img2dataset's free-text error to one status kind (stage: 'download' or 'resize')."""
    msg = (message or "").lower()
    if stage == "download":
        for start, kind in LOCAL_KINDS:  # core.local's messages (--local-root)
            if msg.startswith(start):
                return kind
        if msg.startswith(DISALLOWED.lower()):
            return "robots_disallowed"
        if msg.startswith(UNREACHABLE.lower()) and "(http " in msg:  # the host answered, with an error
            return "robots_unreachable"  # (a host that cannot be reached at all: timeout / connection_error below)
        m = _HTTP_CODE.search(message or "")
        if m:
            code = int(m.group(1))
            if code == 429:
                return "rate_limited"
            if code >= 500:
                return "http_5xx"
            if 300 <= code < 400:
                return "redirect_refused"
            return "http_4xx"
        if "x-robots-tag" in msg:
            return "opt_out"
        if "timed out" in msg or "timeout" in msg:
            return "timeout"
        if any(s in msg for s in ("connection", "refused", "reset", "remote end closed", "name or service",
                                  "temporary failure", "network is unreachable", "errno", "incompleteread",
                                  "eof occurred", "urlopen error")):
            return "connection_error"
        return "download_error"
    if "too large" in msg and "area" in msg:
        return "image_too_large"
    if "truncated" in msg:
        return "truncated_image"
    if "decoding error" in msg or "not an image" in msg:
        return "not_image"
    if "too small" in msg or "aspect ratio" in msg:
        return "filtered_size"
    return "resize_error"


def _guarded_resizer_class():
    from img2dataset.resizer import Resizer
    from PIL import Image

    class GuardedResizer(Resizer):
        """img2dataset's Resizer, after a header-only check: an image declaring more than max_image_area
        pixels (a decompression bomb) is refused before anything is decoded, content that is no image is
        named as such, and a JPEG cut short is refused rather than stored half grey."""

        def __call__(self, img_stream, blurring_bbox_list=None):
            img_stream.seek(0)
            try:
                with Image.open(img_stream) as im:
                    fmt, (w, h) = im.format, im.size
            except Image.DecompressionBombError:
                return None, None, None, None, None, "image area too large (decompression bomb)"
            except Exception:  # pylint: disable=broad-except
                return None, None, None, None, None, "not an image (no known image header)"
            if w * h > self.max_image_area:
                return None, None, None, None, None, f"image area too large ({w}x{h} declared)"
            if fmt == "JPEG":
                tail = img_stream.getvalue()[-64:].rstrip(b"\x00\r\n ")
                if not tail.endswith(b"\xff\xd9"):
                    return None, None, None, None, None, "truncated image (JPEG has no end marker)"
            img_stream.seek(0)
            return super().__call__(img_stream, blurring_bbox_list)

    return GuardedResizer


@dataclasses.dataclass(frozen=True)
class DiskFull:
    """What a download task returns when the disk is full (not raised: a raised error would be logged by every Dask
    worker and retried, and every later shard would fail alike); the build stops with its message."""
    message: str


class _ShardDiskFull(BaseException):
    """Raised by the shard writer on a full disk: a BaseException, so that img2dataset's per-sample `except
    Exception` (which prints a traceback per sample and goes on) lets it through and the shard stops at once."""


class KeyedShardWriter:
    """An img2dataset sample writer (its sample_writer_class interface) that writes the shard directly, through its
    shard format's writer (format.SHARD_FORMATS), under our stable keys and records, for every row, where its image
    lies: the byte offset in the tar, or the row in the Parquet shard. No second pass over the images."""

    def __init__(self, shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format,
                 fmt="webdataset"):  # pylint: disable=unused-argument
        self.path = os.path.join(output_folder, shard_name(shard_id, fmt))
        self.meta_path = os.path.join(output_folder, f"{shard_id:05d}.meta.parquet")
        self.shard = shard_format_impl(fmt).writer(self.path, encode_format)
        self.rows: list[dict] = []
        self.progress_path = os.path.join(output_folder, "rows-done")  # polled by the client's progress bar
        self._reported = 0.0

    def write(self, img_str, key, caption, meta):  # pylint: disable=unused-argument
        try:
            self._write(img_str, caption, meta)
        except OSError as err:
            if is_disk_full(err):  # img2dataset catches Exceptions per sample (a traceback each): stop the shard
                raise _ShardDiskFull(self.path) from None
            raise

    def _write(self, img_str, caption, meta):
        meta = {(k[len(EXTRA):] if k.startswith(EXTRA) else k): v for k, v in meta.items()}  # extra columns by name
        psd_key = meta.pop("psdclip_key")
        meta["key"] = psd_key
        row = {"key": psd_key, "status": meta.get("status"), "error_message": meta.get("error_message"),
               **{c: meta.get(c) for c in ("width", "height", "original_width", "original_height", "sha256")},
               "offset": None, "size": None}
        if img_str is not None:
            row["size"] = len(img_str)
            row["offset"] = self.shard.add(psd_key, img_str, str(caption or ""), meta)
        self.rows.append(row)
        now = time.monotonic()
        if now - self._reported > 0.5:
            self._reported = now
            write_text(self.progress_path, str(len(self.rows)))

    def close(self):
        self.shard.close()
        pd.DataFrame(self.rows, columns=["key", "status", "error_message", "width", "height", "original_width",
                                         "original_height", "sha256", "offset", "size"]).to_parquet(self.meta_path)


@dataclasses.dataclass(frozen=True)
class DownloadOptions:
    """What a download task needs of the build's options (a small picklable object sent with each task)."""
    format: str
    image_size: int
    resize_mode: str
    encode_format: str
    encode_quality: int
    timeout: float
    retries: int
    thread_count: int
    max_image_area: float
    user_agent_token: str | None = None
    user_agent: str | None = None
    ignore_robots_txt: bool = False
    build_id: str = ""  # robots.txt answers are kept per build (a long-lived Dask worker serves several)
    disallowed_header_directives: list | None = None
    host_rate: float = 0.0  # this worker's share of the build's per-host cap (requests/s; 0: none)
    rate_limit_retries: int = 3
    backoff: float = 1.0
    max_backoff: float = 60.0
    shard_timeout: float = 3600.0
    request_timeout: float = 60.0
    local_root: str = ""
    max_image_bytes: int = 50 * 1024 * 1024

    def policy(self):
        """The shard's politeness and time limit, starting now (see polite.py)."""
        return ShardPolicy.starting_now(self.timeout, self.shard_timeout,
                                        host_interval=1.0 / self.host_rate if self.host_rate else 0.0,
                                        throttle_retries=self.rate_limit_retries, backoff=self.backoff,
                                        max_backoff=self.max_backoff, request_timeout=self.request_timeout,
                                        robots=not self.ignore_robots_txt,
                                        user_agent=self.user_agent, user_agent_token=self.user_agent_token,
                                        build_id=self.build_id, local_root=self.local_root,
                                        max_bytes=self.max_image_bytes)

    @classmethod
    def of(cls, cfg) -> "DownloadOptions":
        import uuid

        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if f.name != "build_id"},
                   build_id=uuid.uuid4().hex)


def work_prefix(dataset_dir: str) -> str:
    """The name prefix of the local work folders (in the worker's temporary folder) of this worker process' download
    tasks for a dataset on an object store (workers of one machine share the temporary folder)."""
    import hashlib

    return f"psdclip-{hashlib.sha1(dataset_dir.encode()).hexdigest()[:10]}-{os.getpid()}-"


def rows_in_flight(dataset_dir: str) -> int:
    """On a worker (client.run): the rows its download tasks in flight for the dataset have written (their sample
    writers note it in WORK/rows-done)."""
    import contextlib
    import glob
    import tempfile

    total = 0
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{work_prefix(dataset_dir)}*", "rows-done")):
        with contextlib.suppress(OSError, ValueError):
            with open(path, encoding="utf-8") as f:
                total += int(f.read() or 0)
    return total


def download_partition(src: str, shard: int, dataset_dir: str, opts: DownloadOptions) -> pd.DataFrame:
    """src: the shard's input file (Arrow IPC: url, caption, psdclip_key, in download order; see
    dataset._write_shard_inputs), which img2dataset's Downloader reads itself. Downloads into a private work folder,
    then renames the shard into shards/. Returns one result row per input row (RESULT_COLUMNS + shard)."""
    os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(int(opts.max_image_area)))
    from img2dataset.downloader import Downloader

    install()
    if storage.is_remote(dataset_dir):  # img2dataset and the tar writer work on a local folder of this worker
        import tempfile

        work = tempfile.mkdtemp(prefix=f"{work_prefix(dataset_dir)}{shard:05d}-")
    else:
        work = os.path.join(dataset_dir, "_work", f"{shard:05d}-{uuid.uuid4().hex[:8]}")
        os.makedirs(work)
    try:
        given = os.path.join(work, "input.arrow")  # img2dataset deletes the file it was given: a link, not ours
        storage.fetch(src, given)
        with pa.memory_map(given) as f:
            planned = pa.ipc.open_file(f).read_all()
        keys = planned.column("psdclip_key").to_pylist()
        extras = [c for c in planned.column_names if c.startswith(EXTRA)]  # --save-additional-columns: into .json
        del planned
        resizer = _guarded_resizer_class()(
            image_size=opts.image_size, resize_mode=opts.resize_mode, resize_only_if_bigger=False,
            upscale_interpolation="lanczos", downscale_interpolation="area", encode_quality=opts.encode_quality,
            encode_format=opts.encode_format, skip_reencode=False, disable_all_reencoding=False,
            min_image_size=0, max_image_area=opts.max_image_area, max_aspect_ratio=float("inf"), blurrer=None)
        downloader = Downloader(
            sample_writer_class=functools.partial(KeyedShardWriter, fmt=opts.format), resizer=resizer,
            thread_count=opts.thread_count, save_caption=True, extract_exif=False, output_folder=work,
            column_list=["url", "caption", "psdclip_key", *extras], timeout=opts.policy(),
            number_sample_per_shard=max(len(keys), 1), oom_shard_count=5, compute_hash="sha256",
            verify_hash_type=None, encode_format=opts.encode_format, retries=opts.retries,
            user_agent_token=opts.user_agent_token,
            disallowed_header_directives=opts.disallowed_header_directives or None)
        try:
            downloader.download_shard((shard, given))  # raises if the shard as a whole fails
            name = shard_name(shard, opts.format)
            meta = in_input_order(os.path.join(work, name), os.path.join(work, f"{shard:05d}.meta.parquet"), keys,
                                  opts.format)
            res = _results(meta, keys, shard)
            storage.put(os.path.join(work, name), storage.join(dataset_dir, "shards", name))
            stats = os.path.join(work, stats_name(shard))  # img2dataset's own, as its output folders hold it
            if os.path.isfile(stats):
                storage.put(stats, storage.join(dataset_dir, "shards", stats_name(shard)))
        except _ShardDiskFull:
            return DiskFull(str(disk_full(dataset_dir)))
        except (OSError, RuntimeError, DiskFullError) as err:  # (DiskFullError: core's atomic writes say it so)
            if is_disk_full(err):
                return DiskFull(str(disk_full(dataset_dir)))
            raise
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)


def in_input_order(path: str, meta_path: str, keys: list, fmt: str) -> pd.DataFrame:
    """Rewrite a downloaded shard with its samples in input order (img2dataset writes them as its threads finish, so
    two builds of one list would hold them in two orders, and train on them in two orders) and return its writer's
    rows with the new offsets. One sequential pass over the shard, on the worker's local disk; nothing is done when
    the order is already the input's."""
    meta = pd.read_parquet(meta_path)
    position = {k: i for i, k in enumerate(keys)}
    placed = meta[meta["offset"].notna()]
    order = sorted(placed["key"], key=lambda k: position.get(k, len(position)))
    if list(placed.sort_values("offset")["key"]) == order:
        return meta
    with atomic_path(path) as ordered:
        offsets = shard_format_impl(fmt).reorder(path, order, ordered)
    meta["offset"] = [offsets.get(k) if pd.notna(o) else None for k, o in zip(meta["key"], meta["offset"])]
    return meta


def i2d_status(status, message) -> tuple[str, str]:
    """(our status, error) of an img2dataset row's status and error_message (a build's downloads and `data import`
    alike)."""
    msg = message if isinstance(message, str) else ""
    if status == "success":  # img2dataset's own status name
        return SUCCESS, msg
    if status == "failed_to_download":
        return classify("download", msg), msg
    if status == "failed_to_resize":
        return classify("resize", msg), msg
    return "download_error", msg or "img2dataset returned no record for this row"


def _results(meta: pd.DataFrame, keys: list, shard: int) -> pd.DataFrame:
    m = meta.drop_duplicates("key").set_index("key").reindex(keys)
    pairs = [i2d_status(st, msg) for st, msg in zip(m["status"].to_numpy(), m["error_message"].to_numpy())]
    status, error = [p[0] for p in pairs], [p[1] for p in pairs]
    res = pd.DataFrame({"key": np.asarray(keys, dtype=object), "status": status, "error": error})
    for col in ("width", "height", "original_width", "original_height", "offset", "size"):
        res[col] = pd.array(m[col].to_numpy(), dtype="Int64")
    res["sha256"] = m["sha256"].fillna("").astype(str).to_numpy()
    res["shard"] = shard
    return res
