"""An input that is a folder of images (`psdclip data build FOLDER --local-root ROOT`): walked into a URL list of
its images, which then goes through the same stages as any list (caption cleaning, URL and image dedupe,
img2dataset's resizer, shards, manifest, subsets, stats, resume).

Captions come from each image's sidecar (`a/b.jpg` + `a/b.txt`, as webdataset and img2dataset users keep them) or
from one caption file: FOLDER/captions.{csv,tsv,jsonl} or FOLDER.{csv,tsv,jsonl} beside the folder, with a path
column (path, file or image: relative to the folder) and a caption column (caption or text). An image with neither
gets an empty caption (its row ends empty_caption). Sidecars are read through core.local, so a sidecar that leads
out of the root is not read. The walk is sorted and follows no symlinked folder; the list is written to
DATASET/_state/folders/ in batches (the client holds one batch), and a rerun on an unchanged folder writes the same
bytes, which the build recognises as ingested. On a folder that has grown, the new list is a new ingest: the new
images are downloaded, the ones already in the dataset become duplicate_url rows of it.
"""
from __future__ import annotations

import hashlib
import os

import pyarrow as pa
import pyarrow.parquet as pq

from ..core.errors import InputError
from ..core.io import atomic_path
from ..core.local import read

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
SCHEMA = pa.schema([("url", pa.string()), ("caption", pa.string())])
BATCH = 10_000


def _caption_file(folder: str) -> str | None:
    for base in (os.path.join(folder, "captions"), folder.rstrip("/")):
        for ext in (".csv", ".tsv", ".jsonl"):
            if os.path.isfile(base + ext):
                return base + ext
    return None


def _captions(path: str) -> dict:
    import pandas as pd

    try:
        frame = pd.read_json(path, lines=True, dtype=False) if path.endswith(".jsonl") else \
            pd.read_csv(path, sep="\t" if path.endswith(".tsv") else ",", dtype=str, keep_default_na=False)
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not a readable caption file ({str(err).splitlines()[0][:160]})") from None
    col = next((c for c in ("path", "file", "image") if c in frame.columns), None)
    cap = next((c for c in ("caption", "text") if c in frame.columns), None)
    if col is None or cap is None:
        raise InputError(f"{path}: a caption file needs a path (or file, image) column and a caption (or text) "
                         f"column; it has {', '.join(map(str, frame.columns))}")
    return {os.path.normpath(str(p)): str(c) for p, c in zip(frame[col], frame[cap])}


def folder_list(folder: str, root: str, state: str) -> str:
    """Walk FOLDER (inside ROOT) into STATE/folders/NAME.parquet (url: the image's path relative to ROOT, caption);
    returns its path."""
    top, base = os.path.realpath(root), os.path.realpath(folder)
    if os.path.commonpath([top, base]) != top:
        raise InputError(f"{folder}: the folder is not inside --local-root {root}")
    captions_path = _caption_file(folder)
    captions = _captions(captions_path) if captions_path else {}
    name = hashlib.sha1(base.encode()).hexdigest()[:12]
    out_dir = os.path.join(state, "folders")
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, f"{os.path.basename(base) or 'root'}-{name}.parquet")
    urls, caps, n = [], [], 0
    with atomic_path(out) as tmp:  # replaced whole; removed if the walk fails or finds no image
        with pq.ParquetWriter(tmp, SCHEMA) as writer:
            for here, dirs, files in os.walk(base, followlinks=False):
                dirs.sort()
                for f in sorted(files):
                    if not f.lower().endswith(IMAGE_EXTENSIONS):
                        continue
                    rel = os.path.relpath(os.path.join(here, f), base)
                    caption = captions.get(os.path.normpath(rel))
                    if caption is None:
                        stem = os.path.splitext(os.path.join(here, f))[0] + ".txt"
                        data, _ = read(os.path.relpath(stem, top), root, limit=65_536) if os.path.lexists(stem) \
                            else (None, None)
                        caption = data.getvalue().decode("utf-8", "replace").strip() if data is not None else ""
                    urls.append(os.path.relpath(os.path.join(here, f), top))
                    caps.append(caption)
                    if len(urls) == BATCH:
                        writer.write_table(pa.table({"url": urls, "caption": caps}, schema=SCHEMA))
                        n += len(urls)
                        urls, caps = [], []
            if urls or not n:
                writer.write_table(pa.table({"url": urls, "caption": caps}, schema=SCHEMA))
                n += len(urls)
        if not n:
            raise InputError(f"{folder}: no images in the folder ({', '.join(IMAGE_EXTENSIONS)})")
    return out
