"""Streaming training data: shards from a dataset directory, a subset file or shard URLs, read with
webdataset (tars; fsspec paths and `pipe:` commands) or pyarrow (Arrow/Parquet shards).

The stream is a chain of small generator stages (webdataset's style), each testable on a plain list:

    shard order (seeded per epoch; resampled on request) -> split by rank and worker -> samples
    -> keep the subset's samples (its rule per key; a legacy subset's key set) -> shuffle buffer (seeded) -> skip (resume) -> decode + transform + tokenize
    -> batch (inside the worker)

Every batch carries (reader, epoch, samples of that epoch it has used), so the trainer knows exactly how far
each reader got; a resumed run skips that far without decoding. A reader whose pass holds fewer samples than
a batch (a small subset split over many readers) fills its batch from the next pass. A corrupt or truncated shard or sample is
skipped, counted and logged; training goes on.
"""
from __future__ import annotations

import io
import json
import logging
import os
import random
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from psdclip.pipeline.errors import InputError
from psdclip.pipeline import storage
from psdclip.pipeline.status import SUCCESS

J = storage.join

log = logging.getLogger(__name__)


@dataclass
class Source:
    """What to stream: shard URLs, which of their samples to keep, and the format. A dataset or subset keeps
    the samples its rule takes (SubsetRule: whole shards, one boundary shard by key rank) that its shard's
    manifest file does not exclude; only datasets written before the manifest/ folder keep a key set."""

    shards: list[str]
    keys: frozenset | None = None  # legacy datasets (manifest.parquet, subsets listing keys)
    rule: object | None = None  # a psdclip.pipeline.subsets.SubsetRule
    format: str = "webdataset"
    root: str | None = None  # the dataset directory, when there is one
    spec: str = ""
    samples: int | None = None  # known number of usable samples


def resolve_source(spec: str) -> Source:
    """A dataset directory, DATASET/subsets/NAME.json, or shard URLs (brace patterns, fsspec, pipe:)."""
    if "{" not in spec and not spec.startswith("pipe:") and storage.isdir(spec):
        return _from_dataset(storage.resolve(spec), spec)
    if spec.endswith(".json") and not spec.startswith("pipe:"):
        root = storage.resolve(spec).rsplit("/", 2)[0]
        if not storage.isfile(spec):
            names = sorted(f[:-5] for f in storage.listdir(J(root, "subsets")) if f.endswith(".json"))
            raise InputError(f"--data {spec}: no such subset (available: {', '.join(names) or 'none'})")
        return _from_subset(spec, root)
    import webdataset as wds

    urls = wds.shardlists.expand_urls(spec)
    if not urls:
        raise InputError(f"--data {spec!r}: no shards")
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    if local and not any(os.path.exists(u) for u in local):
        raise InputError(f"--data {spec}: not a psdclip dataset, subset file or existing shard")
    fmt = "arrow" if all(u.endswith(".parquet") for u in urls) else "webdataset"
    return Source(shards=urls, format=fmt, spec=spec)


def _read_json(path: str) -> dict:
    try:
        with storage.open_file(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read ({err})") from None


def _from_dataset(root: str, spec: str) -> Source:
    from psdclip.pipeline.subsets import SubsetRule

    info_path = J(root, "dataset.json")
    manifest_dir, legacy = J(root, "manifest"), J(root, "manifest.parquet")
    if not storage.isfile(info_path) or not (storage.isdir(manifest_dir) or storage.isfile(legacy)):
        raise InputError(f"--data {spec}: not a psdclip dataset (no dataset.json / manifest); "
                         f"build one with `psdclip data build`")
    info = _read_json(info_path)
    fmt = info.get("output_format", "webdataset")
    ext = "parquet" if fmt == "arrow" else "tar"
    if storage.isdir(manifest_dir):  # dataset.json names the shards holding samples: no row is read here
        names = [f"{int(s):05d}.{ext}" for s in info.get("shards", [])]
        samples = int((info.get("counts") or {}).get("success", 0))
        if not names or not samples:
            raise InputError(f"--data {spec}: the dataset has no successful samples (see `psdclip data stats {spec}`)")
        return Source(shards=[J(root, "shards", n) for n in names], rule=SubsetRule(whole=frozenset(names)),
                      format=fmt, root=root, spec=spec, samples=samples)
    import pandas as pd

    m = pd.read_parquet(legacy, columns=["key", "status", "shard"])
    ok = m[m["status"] == SUCCESS]
    if ok.empty:
        raise InputError(f"--data {spec}: the dataset has no successful samples ({len(m)} rows; see "
                         f"`psdclip data stats {spec}`)")
    shards = [J(root, "shards", f"{int(s):05d}.{ext}") for s in sorted(ok["shard"].dropna().unique())]
    return Source(shards=shards, keys=frozenset(ok["key"]), format=fmt, root=root, spec=spec, samples=len(ok))


def _from_subset(path: str, root: str) -> Source:
    from psdclip.pipeline.subsets import SubsetRule

    doc = _read_json(path)
    if "shards" not in doc or not ("keys" in doc or "boundary" in doc):
        raise InputError(f"--data {path}: not a subset file (no shards and keys/boundary)")
    info = _read_json(J(root, "dataset.json")) if storage.isfile(J(root, "dataset.json")) else {}
    fmt = info.get("output_format", "webdataset")
    if "keys" in doc:  # written before subsets became rules
        if not doc["keys"]:
            raise InputError(f"--data {path}: the subset is empty")
        return Source(shards=[J(root, s) for s in doc["shards"]], keys=frozenset(doc["keys"]),
                      format=fmt, root=root, spec=path, samples=len(doc["keys"]))
    rule = SubsetRule.of(doc)
    if not int(doc.get("count", 0)) or not rule.shards():
        raise InputError(f"--data {path}: the subset is empty")
    return Source(shards=[J(root, "shards", n) for n in rule.shards()], rule=rule, format=fmt, root=root,
                  spec=path, samples=int(doc["count"]))


# ---- stages -------------------------------------------------------------------------------------------

def epoch_shards(shards: list[str], epoch: int, seed: int, resampled: bool) -> list[str]:
    rng = random.Random(seed * 100_003 + epoch)
    if resampled:
        return [rng.choice(shards) for _ in shards]
    order = list(shards)
    rng.shuffle(order)
    return order


def split(items: list, index: int, count: int) -> list:
    return items[index::count]


def reader_shards(order: list[str], reader: int, readers: int) -> tuple[list[str], int, int]:
    """(the shards this reader opens, how many readers share them, this reader's part of their samples).
    With at least as many shards as readers each reader opens its own shards whole; with fewer, each opens one
    shard and takes every share-th sample of it, so no reader reads a shard it takes nothing from."""
    if len(order) >= readers:
        return split(order, reader, readers), 1, 0
    shard = reader % len(order)
    return [order[shard]], len(range(shard, readers, len(order))), reader // len(order)


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


def arrow_samples(urls, on_error, ext: str = "jpg"):
    import fsspec
    import pyarrow.parquet as pq

    for url in urls:
        try:
            with fsspec.open(url, "rb") as f:
                pf = pq.ParquetFile(f)
                for batch in pf.iter_batches(columns=["key", ext, "caption"], batch_size=256):
                    for key, img, cap in zip(*(batch.column(i).to_pylist() for i in range(3))):
                        yield {"__key__": key, ext: img, "txt": (cap or "").encode(), "__url__": url}
        except Exception as err:  # pylint: disable=broad-except
            on_error(f"shard {url}: {err}")


def keep_members(samples, rule, root: str):
    """Keep the samples `rule` takes (decided per key) that their shard's manifest file does not exclude
    (duplicate_image: the bytes stay in the shard). Holds one shard's exclusions at a time."""
    from psdclip.pipeline.dataset import shard_exclusions

    current, excluded = None, frozenset()
    for s in samples:
        shard = os.path.basename(str(s.get("__url__", "")))
        if shard != current:
            current, excluded = shard, (shard_exclusions(root, shard) if root else frozenset())
        key = s.get("__key__")
        if key not in excluded and rule.keep(shard, key):
            yield s


def select(samples, source: Source):
    if source.keys is not None:
        return keep_keys(samples, source.keys)
    if source.rule is not None:
        return keep_members(samples, source.rule, source.root)
    return samples


def keep_keys(samples, keys):
    if keys is None:
        yield from samples
        return
    for s in samples:
        if s.get("__key__") in keys:
            yield s


def shuffle(samples, bufsize: int, rng: random.Random):
    buf = []
    for s in samples:
        if len(buf) < bufsize:
            buf.append(s)
            continue
        k = rng.randrange(len(buf))
        buf[k], s = s, buf[k]
        yield s
    rng.shuffle(buf)
    yield from buf


def seeded(transform, image, seed: str):
    """transform(image) with torch's CPU generator (which torchvision's and open_clip's random augmentations
    draw from) seeded from `seed` for the call and restored after it: a sample's augmentation then depends on
    (run seed, epoch, sample key) only, not on what the reader drew before, so a resumed run (or one with another
    worker count) augments each sample exactly as the uninterrupted run did."""
    gen = torch.default_generator  # (torch.manual_seed would also seed every accelerator: 100x slower)
    state = gen.get_state()
    gen.manual_seed(zlib.crc32(seed.encode()))
    try:
        return transform(image)
    finally:
        gen.set_state(state)


def decode(samples, transform, tokenize, on_error, aug_seed: str | None = None):
    """(image tensor, tokens, key) per sample; with aug_seed, each sample's augmentation is seeded from
    (aug_seed, key) (see seeded)."""
    from PIL import Image

    for s in samples:
        try:
            raw = s.get("jpg") or s.get("png") or s.get("webp") or s.get("jpeg")
            if raw is None:
                raise ValueError("no image in sample")
            with Image.open(io.BytesIO(raw)) as im:
                rgb = im.convert("RGB")
                image = transform(rgb) if aug_seed is None else seeded(transform, rgb, f"{aug_seed}-{s['__key__']}")
            text = s.get("txt", b"")
            text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
            yield image, tokenize([text])[0], s["__key__"]
        except Exception as err:  # pylint: disable=broad-except
            on_error(f"sample {s.get('__key__')}: {err}")


class ShardStream(IterableDataset):
    """An endless stream of batches for one rank; workers split the shards (or, with fewer shards than
    readers, each shard's samples among the readers of that shard: see reader_shards)."""

    def __init__(self, spec: str, batch_size: int, transform, tokenizer, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle_buffer: int = 1000, resampled: bool = False, follow: bool = False,
                 resume: dict | None = None):
        super().__init__()
        self.spec, self.batch_size, self.transform, self.tokenizer = spec, batch_size, transform, tokenizer
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer, self.resampled, self.follow = shuffle_buffer, resampled, follow
        self.resume = resume or {}
        self.source = resolve_source(spec)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        reader, readers = self.rank * workers + worker, self.world_size * workers
        start = self.resume.get(str(reader)) or self.resume.get(reader) or {}
        epoch = int(start.get("epoch", 0))
        # samples of that epoch already trained on (older checkpoints recorded whole batches)
        skip = int(start.get("samples", int(start.get("batches", 0)) * self.batch_size))
        skipped = [0]

        def on_error(msg):
            skipped[0] += 1
            log.warning("skipped %s", msg)

        images, texts, keys = [], [], []
        batches = 0
        while True:
            source = resolve_source(self.spec) if (self.follow and epoch > 0) else self.source
            order = epoch_shards(source.shards, epoch, self.seed, self.resampled)
            mine, share, part = reader_shards(order, reader, readers)
            raw = (arrow_samples(mine, on_error) if source.format == "arrow" else tar_samples(mine, on_error))
            raw = select(raw, source)
            if share > 1:  # fewer shards than readers: the readers of a shard split its samples
                raw = (s for i, s in enumerate(raw) if i % share == part)
            raw = shuffle(raw, self.shuffle_buffer, random.Random(f"{self.seed}-{epoch}-{reader}"))
            if skip:  # resume: drop what was already trained on, before any decoding
                for _ in range(skip):
                    if next(raw, None) is None:
                        break
            used, skip, fresh = skip, 0, 0
            for image, text, key in decode(raw, self.transform, self.tokenizer, on_error, f"{self.seed}-{epoch}"):
                images.append(image)
                texts.append(text)
                keys.append(key)
                used += 1
                fresh += 1
                if len(images) == self.batch_size:
                    batches += 1
                    yield {"image": torch.stack(images), "text": torch.stack(texts), "keys": keys,
                           "reader": reader, "epoch": epoch, "samples": used, "batches": batches,
                           "skipped": skipped[0]}
                    images, texts, keys = [], [], []
            if fresh == 0 and not images:
                raise InputError(f"--data {self.spec}: reader {reader} found no readable sample in a whole pass")
            epoch += 1  # a batch not yet full is filled from the next pass (a small subset, many readers)
            batches = 0


def make_loader(stream: ShardStream, workers: int) -> DataLoader:
    # a fixed generator: the workers' seeds (augmentations) are the same in a resumed run
    return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=_worker_init, generator=torch.Generator().manual_seed(stream.seed))


def _worker_init(_):
    import signal

    # Ctrl-C reaches the whole process group: it is for the trainer, which checkpoints and stops (a worker that
    # died of it first would take the batch in flight with it)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM to the whole group (Slurm's scancel, `kill -TERM -PGID`) or from the DataLoader's own shutdown: leave
    # quietly with exit 0, so the trainer sees a worker that ended (which it handles between steps), not one
    # "killed by signal" (which torch raises at any point of a step, before the trainer can checkpoint)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    torch.set_num_threads(1)
    np.random.seed(torch.initial_seed() % 2**32)
