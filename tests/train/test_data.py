import json
import os
import random
import shutil

from psdclip.pipeline.subsets import member_keys
from psdclip.pipeline.reader import tar_samples
from psdclip.train.data import (ShardStream, epoch_shards, keep_keys, reader_shards, resolve_source, shuffle, split)
from psdclip.train.models import build_model


def test_stages_on_plain_lists():
    shards = [f"s{i}" for i in range(10)]
    e0, e1 = epoch_shards(shards, 0, 1, False), epoch_shards(shards, 1, 1, False)
    assert sorted(e0) == shards and e0 != e1 and e0 == epoch_shards(shards, 0, 1, False)
    resampled = [epoch_shards(shards, e, 1, True) for e in range(5)]  # with replacement, seeded per epoch
    assert all(set(r) <= set(shards) and len(r) == 10 for r in resampled)
    assert any(len(set(r)) < 10 for r in resampled) and resampled[0] == epoch_shards(shards, 0, 1, True)
    parts = [split(e0, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == shards
    samples = [{"__key__": k} for k in "abcdef"]
    assert [s["__key__"] for s in keep_keys(samples, frozenset("ace"))] == ["a", "c", "e"]
    a = list(shuffle(range(100), 10, random.Random(3)))
    assert sorted(a) == list(range(100)) and a != list(range(100)) and a == list(shuffle(range(100), 10, random.Random(3)))


def test_truncated_or_damaged_tars_are_reported_and_keep_what_they_held(tmp_path):
    import io
    import tarfile

    path = tmp_path / "whole.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(6):
            for ext, data in (("jpg", bytes([i + 1]) * (300 + 700 * i)), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        bounds = [m.offset for m in tar.getmembers()]  # where each member's header starts
    whole = path.read_bytes()

    def read(data):
        p = tmp_path / "shard.tar"
        p.write_bytes(data)
        errors = []
        keys = [s["__key__"] for s in tar_samples([str(p)], errors.append)]
        return keys, errors

    assert read(whole) == ([f"{i:03d}" for i in range(6)], [])
    keys, errors = read(whole[:bounds[6]])  # cut exactly between two members: tarfile itself ends quietly
    assert keys == ["000", "001", "002"] and len(errors) == 1 and "truncated" in errors[0]
    keys, errors = read(whole[:bounds[7] + 100])  # cut inside a member
    assert keys[:3] == ["000", "001", "002"] and len(errors) == 1
    damaged = bytearray(whole)
    damaged[bounds[4]:bounds[4] + 512] = b"\xff" * 512  # an unreadable header: tarfile stops there quietly
    keys, errors = read(bytes(damaged))
    assert keys == ["000", "001"] and len(errors) == 1 and "damaged" in errors[0]


def _take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_stream_filters_keys_and_skips_corrupt_samples_and_shards(dataset_dir, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(dataset_dir, ds)
    _, transform, _, tok = build_model("tiny")
    src = resolve_source(str(ds))
    assert src.samples == 300 and src.keys is None and len(src.shards) == 3  # no key set held
    # corrupt one image inside shard 0 (bytes replaced, same size) and truncate shard 2
    import pandas as pd

    m = pd.read_parquet(ds / "manifest")
    row = m[m["shard"] == 0].iloc[0]
    with open(ds / "shards" / "00000.tar", "r+b") as f:
        f.seek(int(row["offset"]))
        f.write(b"\x00" * int(row["size"]))
    with open(ds / "shards" / "00002.tar", "r+b") as f:
        f.truncate(os.path.getsize(ds / "shards" / "00002.tar") // 2)
    stream = ShardStream(str(ds), 20, transform, tok, seed=0, shuffle_buffer=10)
    batches = _take(stream, 14)  # 280 samples: past the end of the first pass (at most 249 readable), whatever
    keys = [k for b in batches for k in b["keys"]]  # the order of the shards and where the cut falls
    assert row["key"] not in keys
    assert batches[-1]["skipped"] >= 2  # the bad image and the truncated shard were counted
    assert batches[0]["image"].shape == (20, 3, 64, 64) and batches[0]["text"].shape == (20, 32)


def test_resume_position_skips_exactly_what_was_consumed(dataset_dir):
    _, transform, _, tok = build_model("tiny")
    full = _take(ShardStream(str(dataset_dir), 16, transform, tok, seed=5, shuffle_buffer=32), 6)
    pos = {str(full[2]["reader"]): {"epoch": full[2]["epoch"], "batches": full[2]["batches"]}}
    resumed = _take(ShardStream(str(dataset_dir), 16, transform, tok, seed=5, shuffle_buffer=32, resume=pos), 3)
    assert [b["keys"] for b in resumed] == [b["keys"] for b in full[3:6]]


def test_subset_and_follow_pick_up_new_shards(dataset_dir, tmp_path):
    _, transform, _, tok = build_model("tiny")
    sub = resolve_source(str(dataset_dir / "subsets" / "10pct.json"))
    assert sub.samples == 30 and len(member_keys(str(dataset_dir), sub.rule)) == 30
    ds = tmp_path / "ds"
    shutil.copytree(dataset_dir, ds)
    import pandas as pd

    m = pd.read_parquet(ds / "manifest")
    # hide shard 2 from dataset.json, as if the pipeline had not published it yet
    info = json.loads((ds / "dataset.json").read_text())
    hidden = dict(info, shards=[s for s in info["shards"] if s != 2])
    (ds / "dataset.json").write_text(json.dumps(hidden))
    stream = ShardStream(str(ds), 25, transform, tok, seed=0, shuffle_buffer=10, follow=True)
    it = iter(stream)
    first_epoch = [next(it) for _ in range(8)]  # 200 samples: the whole first pass
    assert {b["epoch"] for b in first_epoch} == {0}
    (ds / "dataset.json").write_text(json.dumps(info))  # now shard 2 is published
    later = [next(it) for _ in range(12)]
    seen = {k for b in later if b["epoch"] == 1 for k in b["keys"]}
    assert seen & set(m.loc[m["shard"] == 2, "key"])


def test_arrow_shards_stream_like_tars(synth_dir, server, tmp_path, scheduler):
    import pandas as pd

    from psdclip.pipeline.build import build
    from psdclip.pipeline.config import BuildConfig

    attrs = pd.read_parquet(synth_dir / "attributes.parquet").head(60)
    urls = tmp_path / "u.csv"
    pd.DataFrame({"url": server.base + "/img/" + attrs["path"], "caption": attrs["caption"]}).to_csv(urls, index=False)
    build(BuildConfig(inputs=[str(urls)], out=str(tmp_path / "ds"), format="arrow", image_size=64, shard_size=30,
                      thread_count=8, progress=False, dask_scheduler=scheduler))
    _, transform, _, tok = build_model("tiny")
    src = resolve_source(str(tmp_path / "ds"))
    assert src.format == "arrow" and all(s.endswith(".parquet") for s in src.shards)
    batches = _take(ShardStream(str(tmp_path / "ds"), 20, transform, tok, shuffle_buffer=10), 4)
    assert batches[0]["image"].shape == (20, 3, 64, 64)
    assert {k for b in batches[:3] for k in b["keys"]} == member_keys(src.root, src.rule)


def test_small_subset_fills_batches_across_passes_and_resumes_there(dataset_dir):
    """30 samples split over 2 readers (15 each) with batch 16 used to hang: a batch now fills from the next
    pass, and a resume from a batch that spanned two passes continues exactly."""
    from psdclip.train.data import make_loader

    _, transform, _, tok = build_model("tiny")
    sub = str(dataset_dir / "subsets" / "10pct.json")
    it = iter(make_loader(ShardStream(sub, 16, transform, tok, seed=1, shuffle_buffer=8), 2))
    batches = [next(it) for _ in range(4)]
    assert all(len(b["keys"]) == 16 for b in batches)
    assert {b["epoch"] for b in batches} >= {1}  # the first batch of each reader needed a second pass
    keys = member_keys(str(dataset_dir), resolve_source(sub).rule)
    assert all(set(b["keys"]) <= keys for b in batches)
    one = list(iter(ShardStream(sub, 16, transform, tok, seed=1, shuffle_buffer=8)).__next__()["keys"])
    assert len(one) == 16 and len(set(one)) == 16  # a single reader: 30 distinct samples, no repeat in a batch
    # resume after the batch that spanned passes 0 and 1 of a single reader (batch 20 of 30 samples)
    full = _take(ShardStream(sub, 20, transform, tok, seed=2, shuffle_buffer=8), 4)
    assert (full[1]["epoch"], full[1]["samples"]) == (1, 10)
    pos = {str(full[1]["reader"]): {"epoch": full[1]["epoch"], "samples": full[1]["samples"]}}
    resumed = _take(ShardStream(sub, 20, transform, tok, seed=2, shuffle_buffer=8, resume=pos), 2)
    assert [b["keys"] for b in resumed] == [b["keys"] for b in full[2:4]]


def test_readers_open_only_shards_they_take_samples_from():
    shards = [f"s{i}" for i in range(3)]
    for readers in (1, 2, 3, 4, 7):
        taken = []
        for r in range(readers):
            mine, share, part = reader_shards(shards, r, readers)
            assert len(mine) == (1 if readers >= 3 else len(split(shards, r, readers)))
            taken += [(s, share, part) for s in mine]
        # every shard is read, and each of its samples by exactly one reader (parts 0..share-1 of it)
        for s in shards:
            parts = sorted(p for name, share, p in taken if name == s)
            shares = {share for name, share, _ in taken if name == s}
            assert len(shares) == 1 and parts == list(range(shares.pop())), (readers, s, parts)


def test_duplicate_images_are_left_out_and_legacy_datasets_still_stream(dataset_dir, tmp_path):
    """A duplicate_image keeps its bytes in the shard: the reader drops it by its shard's manifest file alone. A
    dataset written before manifest/ (manifest.parquet, subsets listing keys) streams as before."""
    import pandas as pd

    from psdclip.pipeline.subsets import SubsetRule

    ds = tmp_path / "ds"
    shutil.copytree(dataset_dir, ds)
    part = pd.read_parquet(ds / "manifest" / "shard-00001.parquet")
    dups = set(part["key"].iloc[:5])
    part.loc[part["key"].isin(dups), "status"] = "duplicate_image"
    part.to_parquet(ds / "manifest" / "shard-00001.parquet")
    _, transform, _, tok = build_model("tiny")
    seen = {k for b in _take(ShardStream(str(ds), 50, transform, tok, shuffle_buffer=10), 6) for k in b["keys"]}
    assert len(seen) == 295 and not seen & dups
    sub = json.loads((ds / "subsets" / "100pct.json").read_text())
    assert dups <= {k for s in SubsetRule.of(sub).shards() for k in pd.read_parquet(ds / "manifest" / f"shard-{s[:5]}.parquet")["key"]}
    seen = {k for b in _take(ShardStream(str(ds / "subsets" / "100pct.json"), 50, transform, tok, shuffle_buffer=10), 6)
            for k in b["keys"]}
    assert len(seen) == 295 and not seen & dups

    legacy = tmp_path / "legacy"
    shutil.copytree(dataset_dir, legacy)
    m = pd.read_parquet(legacy / "manifest")
    shutil.rmtree(legacy / "manifest")
    m.to_parquet(legacy / "manifest.parquet")
    ten = json.loads((legacy / "subsets" / "10pct.json").read_text())
    keys = sorted(member_keys(str(dataset_dir), SubsetRule.of(ten)))
    shards = [f"shards/{n}" for n in SubsetRule.of(ten).shards()]
    (legacy / "subsets" / "10pct.json").write_text(json.dumps({"shards": shards, "keys": keys}))
    src = resolve_source(str(legacy))
    assert src.keys is not None and len(src.keys) == 300
    got = {k for b in _take(ShardStream(str(legacy / "subsets" / "10pct.json"), 10, transform, tok, shuffle_buffer=4), 6)
           for k in b["keys"]}
    assert got == set(keys)


def test_shards_on_an_object_store_are_read_through_fsspec():
    """webdataset's gopen has no s3:// handler (and reaches gs:// through gsutil): object-store shards are opened
    with fsspec (here its in-memory store; tests/pipeline/test_remote.py streams a subset from S3)."""
    import io
    import tarfile

    import fsspec

    from psdclip.pipeline.reader import tar_samples

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for key in ("a", "b"):
            for ext, data in (("jpg", b"img-" + key.encode()), ("txt", b"caption " + key.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/psdclip-shards/00000.tar", buf.getvalue())
    errors = []
    try:
        got = list(tar_samples(["memory://psdclip-shards/00000.tar"], errors.append))
    finally:
        fs.rm("/psdclip-shards", recursive=True)
    assert errors == [] and [(s["__key__"], s["jpg"], s["txt"]) for s in got] == [
        ("a", b"img-a", b"caption a"), ("b", b"img-b", b"caption b")]


def test_a_subset_names_its_dataset_and_missing_shards_are_an_error(dataset_dir, tmp_path):
    """A subset file copied into another dataset is refused there (it names the dataset id written at build time);
    a shard that the dataset or a subset names but that is gone is an error, unless asked to skip it."""
    import pytest

    from psdclip.core.errors import InputError

    info = json.loads((dataset_dir / "dataset.json").read_text())
    doc = json.loads((dataset_dir / "subsets" / "10pct.json").read_text())
    assert info["id"] and doc["dataset_id"] == info["id"]
    other = tmp_path / "other"
    shutil.copytree(dataset_dir, other)
    (other / "dataset.json").write_text(json.dumps({**info, "id": "another-build"}))
    with pytest.raises(InputError, match="the subset was made for another dataset"):
        resolve_source(str(other / "subsets" / "10pct.json"))
    (other / "dataset.json").write_text(json.dumps(info))  # the same dataset, copied: its subsets work
    assert resolve_source(str(other / "subsets" / "10pct.json")).samples == 30
    (other / "shards" / "00002.tar").unlink()
    with pytest.raises(InputError, match=r"1 of its 3 shards are missing \(00002.tar\).*--skip-missing-shards"):
        resolve_source(str(other))
    kept = resolve_source(str(other), skip_missing=True)
    assert [os.path.basename(p) for p in sorted(kept.shards)] == ["00000.tar", "00001.tar"]


def test_a_weighted_mixture_draws_by_weight_and_resumes_every_source_exactly(dataset_dir):
    """--data A::B --data-weights 0.8,0.2 (open_clip's '::'): each sample's source drawn by weight (the shares over
    many samples near the weights), per-source counts in every batch, and a resume from any batch's position
    continues every source, and the draws, exactly."""
    import pytest

    from psdclip.core.errors import InputError

    _, transform, _, tok = build_model("tiny")
    a, b = str(dataset_dir / "subsets" / "10pct.json"), str(dataset_dir / "subsets" / "100pct.json")
    spec = f"{a}::{b}"

    def stream(**kw):
        return ShardStream(spec, 16, transform, tok, seed=3, shuffle_buffer=16, weights=[0.8, 0.2], **kw)

    full = _take(stream(), 12)
    counts = [sum(batch["sources"][k] for batch in full) for k in range(2)]
    assert sum(counts) == 12 * 16 and 0.7 < counts[0] / sum(counts) < 0.9  # binomial: sd ~0.03
    assert all(sum(batch["sources"]) == 16 for batch in full) and len({tuple(x["sources"]) for x in full}) > 1
    pos = {str(full[4]["reader"]): full[4]["position"]}
    assert set(pos[str(full[4]["reader"])]) == {"mix", "drawn"} and pos[str(full[4]["reader"])]["drawn"] == 5 * 16
    resumed = _take(stream(resume=pos), 4)
    assert [x["keys"] for x in resumed] == [x["keys"] for x in full[5:9]]
    assert [x["sources"] for x in resumed] == [x["sources"] for x in full[5:9]]
    with pytest.raises(InputError, match="3 weight"):
        ShardStream(spec, 16, transform, tok, weights=[1.0, 2.0, 3.0])
    with pytest.raises(InputError, match="finite number > 0"):
        ShardStream(spec, 16, transform, tok, weights=[1.0, 0.0])
    sized = ShardStream(spec, 16, transform, tok)  # datasets joined without weights: in proportion to their sizes
    assert sized.weights == [float(resolve_source(a).samples), float(resolve_source(b).samples)]
