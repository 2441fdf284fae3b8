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
import logging
import math
import os
import random
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..core import storage
from ..core.errors import InputError
from ..core.io import read_json
from ..pipeline.format import (
    DatasetLayout,
    dataset_id,
    image_of,
    manifest_file,
    read_info,
    shard_format,
    shard_format_impl,
    shard_format_of_files,
    shard_name,
    shard_number,
)
from ..pipeline.reader import damaged_manifest, shard_exclusions
from ..pipeline.status import SUCCESS
from ..pipeline.subsets import SubsetRule

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
    identity: dict | None = None  # what a resumed run checks it still trains on (dataset id; a subset's definition)


def resolve_source(spec: str, skip_missing: bool = False) -> Source:
    """A dataset directory, DATASET/subsets/NAME.json, or shard URLs (brace patterns, fsspec, pipe:). A shard the
    dataset or subset names that is not there is an error (skip_missing: left out, with a warning)."""
    if "{" not in spec and not spec.startswith("pipe:") and storage.isdir(spec):
        return _present(_from_dataset(storage.resolve(spec), spec), skip_missing)
    if spec.endswith(".json") and not spec.startswith("pipe:"):
        root = storage.resolve(spec).rsplit("/", 2)[0]
        if not storage.isfile(spec):
            names = sorted(f[:-5] for f in storage.listdir(J(root, "subsets")) if f.endswith(".json"))
            raise InputError(f"--data {spec}: no such subset (available: {', '.join(names) or 'none'})")
        return _present(_from_subset(spec, root), skip_missing)
    import webdataset as wds

    urls = wds.shardlists.expand_urls(spec)
    if not urls:
        raise InputError(f"--data {spec!r}: no shards")
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    if local and not any(os.path.exists(u) for u in local):
        raise InputError(f"--data {spec}: not a psdclip dataset, subset file or existing shard")
    return Source(shards=urls, format=shard_format_of_files(urls), spec=spec)


def changed_data(before: dict | None, now: dict | None, spec: str) -> str | None:
    """Why a run begun on the data `before` describes must not resume on `now` (None: it may): a dataset rebuilt in
    place (another id), or a subset whose definition changed (an append to the dataset moves a subset's boundary:
    the same name then holds other samples). Subsets are not made stable under appends: a subset is a fraction of
    the dataset it was made of, and refusing is what keeps a run's samples its own."""
    if not before or not now:
        return None
    if before.get("dataset_id") != now.get("dataset_id"):
        return (f"--data {spec}: not the dataset this run was trained on (dataset id {before.get('dataset_id')} "
                f"then, {now.get('dataset_id')} now: rebuilt in place); train into another --out, or restore it")
    if before.get("subset") != now.get("subset"):
        def said(d):
            d = d or {}
            b = d.get("boundary") or {}
            return (f"{d.get('count', 0):,} samples in {len(d.get('shards', []))} shard(s)"
                    + (f" + {b.get('count', 0):,} of {b.get('shard', '').split('/')[-1]}" if b else ""))
        return (f"--data {spec}: the subset changed since this run began ({said(before.get('subset'))} then, "
                f"{said(now.get('subset'))} now: an append moved its boundary); resuming would train on other "
                f"samples: train into another --out")
    return None


def _present(source: Source, skip_missing: bool) -> Source:
    listed: dict[str, set] = {}  # one listing per folder (a dataset's shards share one), not a request per shard

    def there(path: str) -> bool:
        folder, _, name = path.rpartition("/")
        if folder not in listed:
            listed[folder] = set(storage.listdir(folder)) if storage.isdir(folder) else set()
        return name in listed[folder]

    missing = [p for p in source.shards if not there(p)]
    if not missing:
        return source
    names = ", ".join(os.path.basename(p) for p in missing[:3]) + (", ..." if len(missing) > 3 else "")
    if not skip_missing or len(missing) == len(source.shards):
        raise InputError(f"--data {source.spec}: {len(missing)} of its {len(source.shards)} shards are missing "
                         f"({names}); restore them"
                         + (", or pass --skip-missing-shards to train on the others" if not skip_missing else ""))
    log.warning("--data %s: %d of its %d shards are missing (%s); training on the others (--skip-missing-shards)",
                source.spec, len(missing), len(source.shards), names)
    source.shards = [p for p in source.shards if p not in set(missing)]
    source.samples = None  # (how many the missing shards held is not known here)
    return source


def _from_dataset(root: str, spec: str) -> Source:
    info = read_info(root)
    fmt, layout = shard_format(info), DatasetLayout(root)
    if storage.isdir(layout.manifest):  # dataset.json names the shards holding samples: no row is read here
        names = [shard_name(s, fmt) for s in info.get("shards", [])]
        samples = int((info.get("counts") or {}).get("success", 0))
        if not names or not samples:
            raise InputError(f"--data {spec}: the dataset has no successful samples (see `psdclip data stats {spec}`)")
        return Source(shards=[J(layout.shards, n) for n in names], rule=SubsetRule(whole=frozenset(names)),
                      format=fmt, root=root, spec=spec, samples=samples, identity={"dataset_id": dataset_id(info)})
    import pandas as pd

    m = pd.read_parquet(layout.legacy_manifest, columns=["key", "status", "shard"])
    ok = m[m["status"] == SUCCESS]
    if ok.empty:
        raise InputError(f"--data {spec}: the dataset has no successful samples ({len(m)} rows; see "
                         f"`psdclip data stats {spec}`)")
    shards = [layout.shard_path(s, fmt) for s in sorted(ok["shard"].dropna().unique())]
    return Source(shards=shards, keys=frozenset(ok["key"]), format=fmt, root=root, spec=spec, samples=len(ok))


def _from_subset(path: str, root: str) -> Source:
    try:
        doc = read_json(path)
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err})") from None
    if not isinstance(doc, dict) or "shards" not in doc or not ("keys" in doc or "boundary" in doc):
        raise InputError(f"--data {path}: not a subset file (no shards and keys/boundary)")
    info = read_info(root)
    fmt = shard_format(info)
    if doc.get("dataset_id") and doc["dataset_id"] != dataset_id(info):
        raise InputError(f"--data {path}: the subset was made for another dataset (its dataset id "
                         f"{doc['dataset_id']}, not {dataset_id(info)} of {root}); write subsets of this dataset "
                         f"with `psdclip data build ... --subsets`")
    if "keys" in doc:  # written before subsets became rules
        if not doc["keys"]:
            raise InputError(f"--data {path}: the subset is empty")
        return Source(shards=[J(root, s) for s in doc["shards"]], keys=frozenset(doc["keys"]),
                      format=fmt, root=root, spec=path, samples=len(doc["keys"]))
    rule = SubsetRule.of(doc, root)
    if not int(doc.get("count", 0)) or not rule.shards():
        raise InputError(f"--data {path}: the subset is empty")
    # what the subset is: its shards, boundary and filters (an exclusion's key list stands for itself by its counts)
    definition = {"count": int(doc["count"]), "shards": list(doc["shards"]), "boundary": doc.get("boundary"),
                  **{k: doc[k] for k in ("score", "within") if doc.get(k)}}
    if isinstance(doc.get("exclude"), dict):
        definition["exclude"] = {k: v for k, v in doc["exclude"].items() if k != "keys"}
    return Source(shards=[J(root, "shards", n) for n in rule.shards()], rule=rule, format=fmt, root=root,
                  spec=path, samples=int(doc["count"]),
                  identity={"dataset_id": dataset_id(info), "subset": definition})


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


def keep_members(samples, rule, root: str):
    """Keep the samples `rule` takes (decided per key) that their shard's manifest file does not exclude
    (duplicate_image: the bytes stay in the shard). Holds one shard's exclusions at a time."""

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


def numbered(samples):
    """Each sample's ordinal in its shard (`__ordinal__`: 0, 1, ... in the shard's own order, counted before any
    sample is left out), from which sample_ids makes a stable id."""
    current, n = None, 0
    for s in samples:
        url = s.get("__url__")
        if url != current:
            current, n = url, 0
        s["__ordinal__"] = n
        n += 1
        yield s


def sample_ids(source: Source) -> dict | None:
    """{shard path: the id of its first sample}: a sample's stable id is that plus its ordinal in the shard, dense
    over the source's shards (sorted by number) with room for every row the shard's manifest file holds (a bound
    on the samples in the shard, read from the Parquet footer: no row is read). What the embedding bank indexes
    by. None for a source that is not a dataset or subset (shard URLs: no manifest to bound them)."""
    if source.root is None or source.keys is not None:
        return None
    import pyarrow.parquet as pq

    base, total = {}, 0
    for path in sorted(source.shards, key=lambda p: shard_number(p) or 0):
        base[os.path.basename(path)] = total
        manifest = manifest_file(source.root, shard=shard_number(path))
        fs, p = storage.arrow_filesystem(manifest)
        try:
            total += pq.ParquetFile(p, filesystem=fs).metadata.num_rows
        except (OSError, pa.ArrowException) as err:
            raise damaged_manifest(manifest, err) from None
    base[""] = total  # the number of ids
    return base


def decode(samples, transform, tokenize, on_error, aug_seed: str | None = None, ids: dict | None = None):
    """(image tensor, tokens, key, id) per sample; with aug_seed, each sample's augmentation is seeded from
    (aug_seed, key) (see seeded); the id is the sample's stable id under `ids` (sample_ids), else -1."""
    from PIL import Image

    for s in samples:
        try:
            raw = image_of(s)
            if raw is None:
                raise ValueError("no image in sample")
            with Image.open(io.BytesIO(raw)) as im:
                rgb = im.convert("RGB")
                image = transform(rgb) if aug_seed is None else seeded(transform, rgb, f"{aug_seed}-{s['__key__']}")
            text = s.get("txt", b"")
            text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
            sid = -1 if ids is None else ids[os.path.basename(str(s.get("__url__", "")))] + s["__ordinal__"]
            yield image, tokenize([text])[0], s["__key__"], sid
        except Exception as err:  # pylint: disable=broad-except
            on_error(f"sample {s.get('__key__')}: {err}")


def mixture_parts(spec: str, weights: list[float] | None = None) -> list[str] | None:
    """The sources of a weighted mixture (`--data A::B --data-weights 0.7,0.3`, open_clip's `::` syntax), or None
    for one source. Shard URL patterns joined by `::` without weights stay one source (webdataset's union of
    URL lists, as before); with a dataset or subset among them, the parts are mixed in proportion to their sizes."""
    parts = spec.split("::") if not spec.startswith("pipe:") else [spec]
    if weights:
        if len(weights) != len(parts):
            raise InputError(f"--data-weights: {len(weights)} weight(s) for the {len(parts)} source(s) of --data "
                             f"{spec} (sources are joined by '::')")
        if not all(math.isfinite(w) and w > 0 for w in weights):
            raise InputError(f"--data-weights: every weight must be a finite number > 0, got {weights}")
        return parts
    if len(parts) == 1:
        return None
    if all("{" in p or "://" in p or p.endswith(".tar") or p.endswith(".parquet") for p in parts):
        return None
    return parts


class ShardStream(IterableDataset):
    """An endless stream of batches for one rank; workers split the shards (or, with fewer shards than
    readers, each shard's samples among the readers of that shard: see reader_shards).

    A mixture (`weights`, or several datasets joined by `::`): each reader keeps one sample stream per source and
    draws the source of every sample from a seeded generator by weight (a source's share of a batch is random,
    its expected share the weight's). The position of each source (epoch, samples) and the number of draws are
    the reader's position, so a resumed run continues every source where it was and draws what it would have."""

    def __init__(self, spec: str, batch_size: int, transform, tokenizer, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle_buffer: int = 1000, resampled: bool = False, follow: bool = False,
                 resume: dict | None = None, skip_missing: bool = False, weights: list[float] | None = None,
                 with_ids: bool = False):
        super().__init__()
        self.spec, self.batch_size, self.transform, self.tokenizer = spec, batch_size, transform, tokenizer
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer, self.resampled, self.follow = shuffle_buffer, resampled, follow
        self.resume = resume or {}
        self.skip_missing = skip_missing
        self.parts = mixture_parts(spec, weights)
        if self.parts is None:
            self.sources = [resolve_source(spec, skip_missing)]
            self.weights = [1.0]
            self.source = self.sources[0]
        else:
            self.sources = [resolve_source(p, skip_missing) for p in self.parts]
            sizes = [s.samples for s in self.sources]
            if not weights and None in sizes:
                raise InputError(f"--data {spec}: the size of {self.parts[sizes.index(None)]} is not known; give "
                                 f"--data-weights for the mixture")
            self.weights = [float(w) for w in (weights or sizes)]
            self.source = Source(shards=[u for s in self.sources for u in s.shards], spec=spec,
                                 samples=None if None in sizes else sum(sizes))
        # stable sample ids (what the embedding bank indexes by), when asked: one footer read per shard
        self.ids = sample_ids(self.sources[0]) if with_ids and self.parts is None else None

    def _samples(self, k: int, reader: int, readers: int, start: dict, on_error):
        """Source k's decoded samples for this reader, from `start` (epoch, samples of that epoch already
        trained on), endless: yields (image, text, key, epoch, samples used of that epoch)."""
        epoch = int(start.get("epoch", 0))
        # samples of that epoch already trained on (older checkpoints recorded whole batches)
        skip = int(start.get("samples", int(start.get("batches", 0)) * self.batch_size))
        spec = self.parts[k] if self.parts else self.spec
        while True:
            source = resolve_source(spec, self.skip_missing) if (self.follow and epoch > 0) else self.sources[k]
            order = epoch_shards(source.shards, epoch, self.seed + k, self.resampled)
            mine, share, part = reader_shards(order, reader, readers)
            raw = shard_format_impl(source.format).samples(mine, on_error)
            raw = select(numbered(raw), source)
            if share > 1:  # fewer shards than readers: the readers of a shard split its samples
                raw = (s for i, s in enumerate(raw) if i % share == part)
            raw = shuffle(raw, self.shuffle_buffer, random.Random(f"{self.seed + k}-{epoch}-{reader}"))
            if skip:  # resume: drop what was already trained on, before any decoding
                for _ in range(skip):
                    if next(raw, None) is None:
                        break
            used, skip, fresh = skip, 0, 0
            ids = self.ids if not self.follow else None
            for image, text, key, sid in decode(raw, self.transform, self.tokenizer, on_error, f"{self.seed + k}-{epoch}",
                                                ids):
                used += 1
                fresh += 1
                yield image, text, key, sid, epoch, used
            if fresh == 0:
                raise InputError(f"--data {spec}: reader {reader} found no readable sample in a whole pass")
            epoch += 1  # a batch not yet full is filled from the next pass (a small subset, many readers)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        reader, readers = self.rank * workers + worker, self.world_size * workers
        start = self.resume.get(str(reader)) or self.resume.get(reader) or {}
        skipped = [0]

        def on_error(msg):
            skipped[0] += 1
            log.warning("skipped %s", msg)

        n = len(self.sources)
        starts = (start.get("mix") or [{}] * n) if n > 1 else [start]  # each source's (epoch, samples)
        streams = [self._samples(k, reader, readers, starts[k], on_error) for k in range(n)]
        at = [dict(s) for s in starts]  # each source's position: {"epoch", "samples"}
        drawn = int(start.get("drawn", 0)) if n > 1 else 0
        mix = random.Random(f"{self.seed}-mix-{reader}")
        for _ in range(drawn):  # a resumed reader draws what it would have drawn
            mix.random()
        total = sum(self.weights)
        cumulative = [sum(self.weights[:k + 1]) / total for k in range(n)]
        images, texts, keys, ids, counts = [], [], [], [], [0] * n
        batches = 0
        while True:
            if n > 1:
                u = mix.random()
                k = next((i for i, c in enumerate(cumulative) if u < c), n - 1)
                drawn += 1
            else:
                k = 0
            image, text, key, sid, epoch, used = next(streams[k])
            if n == 1 and (not at[0] or epoch != at[0].get("epoch")):
                batches = 0  # batches count within an epoch (a single source's position, as before)
            at[k] = {"epoch": epoch, "samples": used}
            images.append(image)
            texts.append(text)
            keys.append(key)
            ids.append(sid)
            counts[k] += 1
            if len(images) == self.batch_size:
                batches += 1
                position = {**at[0], "batches": batches} if n == 1 else {"mix": [dict(a) for a in at], "drawn": drawn}
                yield {"image": torch.stack(images), "text": torch.stack(texts), "keys": keys,
                       "ids": torch.tensor(ids, dtype=torch.long), "reader": reader,
                       "epoch": at[0].get("epoch", 0), "samples": at[0].get("samples", 0), "batches": batches,
                       "position": position, "sources": counts, "skipped": skipped[0]}
                images, texts, keys, ids, counts = [], [], [], [], [0] * n


def make_loader(stream: ShardStream, workers: int) -> DataLoader:
    # a fixed generator: the workers' seeds (augmentations) are the same in a resumed run
    return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                      prefetch_factor=2 if workers > 0 else None, pin_memory=torch.cuda.is_available(),
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
