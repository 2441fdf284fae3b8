"""Download one partition with img2dataset, on a Dask worker, and publish it as one shard.

Dask plays the part of img2dataset's distributor (as its pyspark and ray distributors do): each task
builds img2dataset's Resizer and Downloader and downloads one shard with its thread pool, into a private
work folder. The shard is then rewritten under our stable keys (sorted in plan order, with the byte
offset of every image recorded) to a temporary name and renamed into shards/, so a reader never sees a
partial shard and a rerun simply redoes a shard whose result was not recorded.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq

TRANSIENT = ("timeout", "http_5xx", "rate_limited", "connection_error")
RESULT_COLUMNS = ["key", "status", "error", "width", "height", "original_width", "original_height", "sha256",
                  "offset", "size"]

_HTTP_CODE = re.compile(r"HTTP Error (\d{3})")


def classify(stage: str, message: str | None) -> str:
    """Map img2dataset's free-text error to one status kind (stage: 'download' or 'resize')."""
    msg = (message or "").lower()
    if stage == "download":
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
    from PIL import Image
    from img2dataset.resizer import Resizer

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


def download_partition(rows: pd.DataFrame, shard: int, dataset_dir: str, opts: dict) -> pd.DataFrame:
    """rows: key, url, caption, order for one partition. Writes shards/<shard>.<tar|parquet>; returns one
    result row per input row (RESULT_COLUMNS + shard)."""
    os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(int(opts["max_image_area"])))
    from img2dataset.downloader import Downloader
    from img2dataset.writer import ParquetSampleWriter, WebDatasetSampleWriter

    arrow = opts["format"] == "arrow"
    work = os.path.join(dataset_dir, "_work", f"{shard:05d}-{uuid.uuid4().hex[:8]}")
    os.makedirs(work)
    try:
        rows = rows.sort_values("order", kind="stable").reset_index(drop=True)
        src = os.path.join(work, "input.arrow")
        table = pa.table({"url": rows["url"].astype(str), "caption": rows["caption"].astype(str),
                          "psdclip_key": rows["key"].astype(str)})
        feather.write_feather(table, src, compression="uncompressed")
        resizer = _guarded_resizer_class()(
            image_size=opts["image_size"], resize_mode=opts["resize_mode"], resize_only_if_bigger=False,
            upscale_interpolation="lanczos", downscale_interpolation="area", encode_quality=opts["encode_quality"],
            encode_format=opts["encode_format"], skip_reencode=False, disable_all_reencoding=False,
            min_image_size=0, max_image_area=opts["max_image_area"], max_aspect_ratio=float("inf"), blurrer=None)
        downloader = Downloader(
            sample_writer_class=ParquetSampleWriter if arrow else WebDatasetSampleWriter, resizer=resizer,
            thread_count=opts["thread_count"], save_caption=True, extract_exif=False, output_folder=work,
            column_list=["url", "caption", "psdclip_key"], timeout=opts["timeout"],
            number_sample_per_shard=max(len(rows), 1), oom_shard_count=5, compute_hash="sha256",
            verify_hash_type=None, encode_format=opts["encode_format"], retries=opts["retries"],
            user_agent_token=opts.get("user_agent_token"),
            disallowed_header_directives=opts.get("disallowed_header_directives") or None)
        downloader.download_shard((shard, src))  # raises if the shard as a whole fails
        meta = pq.read_table(os.path.join(work, f"{shard:05d}.parquet")).to_pandas()
        if arrow:
            return _publish_arrow(meta, rows, shard, dataset_dir, opts["encode_format"])
        return _publish_tar(os.path.join(work, f"{shard:05d}.tar"), meta, rows, shard, dataset_dir,
                            opts["encode_format"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _results(meta: pd.DataFrame, rows: pd.DataFrame, shard: int) -> pd.DataFrame:
    meta = meta.set_index("psdclip_key")
    res = pd.DataFrame({"key": rows["key"].to_numpy()})
    m = meta.reindex(res["key"])
    status, error = [], []
    for st, msg in zip(m["status"].to_numpy(), m["error_message"].to_numpy()):
        msg = msg if isinstance(msg, str) else ""
        if st == "success":
            status.append("success")
        elif st == "failed_to_download":
            status.append(classify("download", msg))
        elif st == "failed_to_resize":
            status.append(classify("resize", msg))
        else:
            status.append("download_error")
            msg = msg or "img2dataset returned no record for this row"
        error.append(msg)
    res["status"] = status
    res["error"] = error
    for col in ("width", "height", "original_width", "original_height"):
        res[col] = pd.array(m[col].to_numpy(), dtype="Int64")
    res["sha256"] = m["sha256"].fillna("").astype(str).to_numpy()
    res["shard"] = shard
    return res


def _atomic_publish(tmp: str, final: str) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def _publish_tar(tar_path: str, meta: pd.DataFrame, rows: pd.DataFrame, shard: int, dataset_dir: str,
                 ext: str) -> pd.DataFrame:
    res = _results(meta, rows, shard)
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as src:
        for info in src:
            if not info.isfile():
                continue
            base, _, suffix = info.name.partition(".")
            members.setdefault(base, {})[suffix] = src.extractfile(info).read()
    by_psd = {}
    for sample in members.values():
        doc = json.loads(sample["json"])
        by_psd[doc.pop("psdclip_key")] = (sample, doc)
    out_dir = os.path.join(dataset_dir, "shards")
    final = os.path.join(out_dir, f"{shard:05d}.tar")
    tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as dst:
        for key, status in zip(res["key"], res["status"]):
            if status != "success" or key not in by_psd:
                continue
            sample, doc = by_psd[key]
            doc["key"] = key
            for suffix, data in ((ext, sample[ext]), ("txt", sample.get("txt", b"")),
                                 ("json", json.dumps(doc, ensure_ascii=False).encode())):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mode, info.mtime = len(data), 0o444, 0
                dst.addfile(info, io.BytesIO(data))
    offsets, sizes = {}, {}
    with tarfile.open(tmp) as check:
        for info in check:
            if info.name.endswith(f".{ext}"):
                offsets[info.name[: -len(ext) - 1]] = info.offset_data
                sizes[info.name[: -len(ext) - 1]] = info.size
    _atomic_publish(tmp, final)
    res["offset"] = pd.array([offsets.get(k) for k in res["key"]], dtype="Int64")
    res["size"] = pd.array([sizes.get(k) for k in res["key"]], dtype="Int64")
    res.loc[res["status"].eq("success") & res["offset"].isna(), ["status", "error"]] = \
        ["download_error", "image missing from img2dataset's shard"]
    return res


def _publish_arrow(meta: pd.DataFrame, rows: pd.DataFrame, shard: int, dataset_dir: str, ext: str) -> pd.DataFrame:
    res = _results(meta, rows, shard)
    ok = meta[meta["status"] == "success"].set_index("psdclip_key")
    keep = [k for k, s in zip(res["key"], res["status"]) if s == "success" and k in ok.index]
    part = ok.loc[keep]
    table = pa.table({
        "key": pa.array(keep, pa.string()),
        ext: pa.array(part[ext].tolist(), pa.binary()),
        "caption": pa.array(part["caption"].astype(str).tolist(), pa.string()),
        "url": pa.array(part["url"].astype(str).tolist(), pa.string()),
        "width": pa.array(part["width"].tolist(), pa.int32()),
        "height": pa.array(part["height"].tolist(), pa.int32()),
        "original_width": pa.array(part["original_width"].tolist(), pa.int32()),
        "original_height": pa.array(part["original_height"].tolist(), pa.int32()),
        "sha256": pa.array(part["sha256"].tolist(), pa.string()),
    })
    final = os.path.join(dataset_dir, "shards", f"{shard:05d}.parquet")
    tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
    pq.write_table(table, tmp, row_group_size=256)
    _atomic_publish(tmp, final)
    index = {k: i for i, k in enumerate(keep)}
    sizes = dict(zip(keep, (len(b) for b in part[ext].tolist())))
    res["offset"] = pd.array([index.get(k) for k in res["key"]], dtype="Int64")
    res["size"] = pd.array([sizes.get(k) for k in res["key"]], dtype="Int64")
    return res
