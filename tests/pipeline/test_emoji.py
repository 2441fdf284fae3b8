"""The emoji source: packages in the npm registry's layout (emoji-datasource-<vendor>: emoji.json and
img/<vendor>/64/*.png; emojibase-data: en/data.json), made here with their pinned checksums swapped for the local
tarballs' (the registry is not reached by tests), then the split, the captions, the oracle's truth, and a study
sweep through the real pipeline: served on loopback, built, trained with the oracle and the bank, and evaluated on
the in-distribution and the never-trained-vendor retrieval lists."""
import io
import json
import os
import tarfile

import pandas as pd
import pytest
import yaml
from PIL import Image, ImageDraw

from helpers.cli import cli

from psdclip.pipeline import emoji

VENDORS = ("apple", "google", "twitter")
CODES = [(f"1F{600 + k:03X}", f"thing {k} face", [f"tag{k}", "face"]) for k in range(24)]
TONED = "1F44B"  # with five skin-tone variants


def _png(colour, size=64, vendor=0, k=0):
    im = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    box = [8 + vendor * 3, 8 + (k % 5) * 2, 56 - vendor * 2, 56]
    (d.ellipse if (k + vendor) % 2 else d.rectangle)(box, fill=colour)
    return im


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _packages(cache):
    os.makedirs(cache, exist_ok=True)
    pinned = {}
    data = [{"hexcode": code, "label": label, "tags": tags, "group": 0} for code, label, tags in CODES]
    data.append({"hexcode": TONED, "label": "waving hand", "tags": ["hi"], "group": 1,
                 "skins": [{"hexcode": f"{TONED}-1F3F{c}", "label": f"waving hand: tone {c}", "group": 1}
                           for c in "BCDEF"]})
    data.append({"hexcode": "1F3FB", "label": "light skin tone", "group": 2})  # a component: left out
    path = os.path.join(cache, "emojibase-data-17.0.0.tgz")
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "package/en/data.json", json.dumps(data).encode())
    pinned["emojibase-data"] = ("17.0.0", emoji.integrity(path))
    for v, vendor in enumerate(VENDORS):
        meta = [{"unified": code, "image": f"{code.lower()}.png", f"has_img_{vendor}": True} for code, _, _ in CODES]
        meta.append({"unified": TONED, "image": f"{TONED.lower()}.png",
                     "skin_variations": {c: {"unified": f"{TONED}-1F3F{c}", "image": f"{TONED.lower()}-1f3f{c.lower()}.png"}
                                         for c in "BCDEF"}})
        path = os.path.join(cache, f"emoji-datasource-{vendor}-16.0.0.tgz")
        with tarfile.open(path, "w:gz") as tar:
            _add(tar, "package/emoji.json", json.dumps(meta).encode())
            names = [m["image"] for m in meta] + [f"{TONED.lower()}-1f3f{c.lower()}.png" for c in "BCDEF"]
            for k, name in enumerate(names):
                buf = io.BytesIO()
                _png((40 * (k % 6), 200 - 7 * k, 30 * v, 255), vendor=v, k=k).save(buf, "PNG")
                _add(tar, f"package/img/{vendor}/64/{name}", buf.getvalue())
        pinned[f"emoji-datasource-{vendor}"] = ("16.0.0", emoji.integrity(path))
    return pinned


@pytest.fixture()
def packages(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    pinned = _packages(str(cache))
    monkeypatch.setattr(emoji, "PACKAGES", {**emoji.PACKAGES, **pinned})
    return cache


def test_source_split_captions_and_truth(packages, tmp_path):
    out = tmp_path / "emoji"
    r = cli("data", "emoji", "--out", out, "--cache", packages, "--train-vendors", "apple,google", "--test-vendor",
            "twitter", "--heldout-frac", "0.3", "--mismatch-frac", "0.2")
    assert "training pairs of 30 emoji" in r.stdout  # 24 + the base and its 5 tones; the component left out
    attrs = pd.read_parquet(out / "attributes.parquet")
    held = pd.read_parquet(out / "heldout" / "attributes.parquet")
    ids, ood = held[held["set"] == "id"], held[held["set"] == "ood"]
    assert len(ids) == len(ood) and sorted(ids["hexcode"]) == sorted(ood["hexcode"]) and len(ids) > 0
    assert set(ood["vendor"]) == {"twitter"} and "twitter" not in set(attrs["vendor"])
    # a held-out emoji is trained on in the other training vendor's drawing, never in the held-out one
    train_pairs = set(zip(attrs["vendor"], attrs["hexcode"]))
    for v, code in zip(ids["vendor"], ids["hexcode"]):
        other = next(iter({"apple", "google"} - {v}))
        assert (v, code) not in train_pairs and (other, code) in train_pairs
    assert len(attrs) == 2 * 30 - len(ids)
    # every image is RGB on white where the drawing is transparent
    with Image.open(out / "images" / "twitter" / f"{TONED}-1F3FB.png") as im:
        assert im.mode == "RGB" and im.getpixel((0, 0)) == (255, 255, 255)
    # the retrieval lists name files that exist, captioned by their CLDR label
    lst = pd.read_csv(out / "heldout" / "ood.csv")
    assert all((out / "heldout" / p).is_file() for p in lst["image"])
    labels = dict(zip(ood["hexcode"], ood["caption"]))
    assert set(lst["caption"]) == set(labels.values())
    # captions: the truth of a mismatch is the other emoji, of a generic caption none; tones share their base
    kinds = set(attrs["caption_kind"])
    assert {"clean", "mismatch"} <= kinds
    mism = attrs[attrs["caption_kind"] == "mismatch"]
    assert (mism["text_group"] != mism["image_group"]).all()
    assert (attrs[attrs["caption_kind"] == "generic"]["text_group"] == "").all()
    toned = attrs[attrs["hexcode"].str.startswith(TONED)]
    assert set(toned["image_group"]) == {TONED}
    # the same command again writes the same source
    again = tmp_path / "again"
    cli("data", "emoji", "--out", again, "--cache", packages, "--train-vendors", "apple,google", "--test-vendor",
        "twitter", "--heldout-frac", "0.3", "--mismatch-frac", "0.2")
    pd.testing.assert_frame_equal(attrs, pd.read_parquet(again / "attributes.parquet"))


def test_fetch_refuses_in_one_line(packages, tmp_path):
    r = cli("data", "emoji", "--out", tmp_path / "a", "--cache", tmp_path / "empty", "--npm", tmp_path / "no-npm",
            check=False)
    assert r.returncode == 2 and "not found; the emoji source fetches its packages with npm" in r.stderr
    r = cli("data", "emoji", "--out", tmp_path / "b", "--cache", tmp_path / "empty", "--npm", "false", check=False)
    assert r.returncode == 2 and "npm pack emojibase-data@17.0.0 failed" in r.stderr
    # a cached tarball that is not the pinned one is fetched again, never used
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "emojibase-data-17.0.0.tgz").write_bytes(b"not the package")
    r = cli("data", "emoji", "--out", tmp_path / "c", "--cache", bad, "--npm", "false", check=False)
    assert r.returncode == 2 and "failed" in r.stderr and "Traceback" not in r.stderr
    r = cli("data", "emoji", "--out", tmp_path / "d", "--test-vendor", "apple", "--train-vendors", "apple",
            check=False)
    assert r.returncode == 2 and "also a training vendor" in r.stderr


def test_emoji_study_sweep_through_the_pipeline(packages, tmp_path, scheduler):
    recipe = {
        "name": "emoji-study", "out": str(tmp_path / "study"),
        "emoji": {"train_vendors": ["apple", "google"], "test_vendor": "twitter", "heldout_frac": 0.3,
                  "cache": str(packages)},
        "data": {"image_size": 32, "shard_size": 20, "thread_count": 8, "dask_scheduler": scheduler},
        "train": {"model": "rn-small", "batch_size": 8, "workers": 0, "warmup": 0.5, "log_every": 1},
        "sweep": {"subsets": ["1.0"], "seeds": [0], "runner": "inprocess", "prune": True,
                  "compute": {"rule": "epochs", "epochs": 2},
                  "primary": "ood.retrieval.t2i_R@10",
                  "metrics": ["ood.retrieval.t2i_R@10", "id.retrieval.t2i_R@10"],
                  "suites": ["id=retrieval:{source}/heldout/id.csv", "ood=retrieval:{source}/heldout/ood.csv"],
                  "methods": {"clip": {"loss": "clip"}, "ls": {"loss": "clip", "label_smoothing": 0.1},
                              "oracle": {"loss": "psd", "oracle_targets": "truth", "alpha_start": 0.5},
                              "bank": {"loss": "psd", "bank_teacher": True, "alpha_start": 0.5}}},
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(recipe))
    cli("sweep", tmp_path / "study.yaml")
    out = tmp_path / "study"
    table = pd.read_csv(out / "results.csv")
    assert set(table["method"]) == {"clip", "ls", "oracle", "bank"}
    assert {"ood.retrieval.t2i_R@10", "id.retrieval.t2i_R@10", "ood.retrieval.i2t_R@1"} <= set(table.columns)
    run = out / "runs" / "100pct-oracle-s0"
    assert {f.name for f in (run / "eval").glob("*.json")} == {"retrieval-id.json", "retrieval-ood.json"}
    assert yaml.safe_load(open(run / "train.yaml"))["oracle_targets"] == str(out / "oracle.parquet")
    truth = pd.read_parquet(out / "oracle.parquet")
    assert len(truth) == json.load(open(out / "dataset" / "dataset.json"))["counts"]["success"]
    rows = [json.loads(x) for x in open(out / "runs" / "100pct-bank-s0" / "metrics.jsonl")]
    assert rows[0]["distill_rows"] == 0.0 and rows[-1]["distill_rows"] > 0.5  # the second epoch distils
