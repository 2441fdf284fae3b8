"""Decontamination (issue 28.3): copies of evaluation images planted in a dataset (the very files, resized,
re-encoded, flipped) are left out of a subset, counted by reason, and the trainer never sees them."""
import io
import json
import os
import tarfile

import numpy as np
import pandas as pd
from PIL import Image

from helpers.cli import cli
from helpers.datasets import cfg
from helpers.servers import Server

from psdclip.pipeline.build import build
from psdclip.pipeline.decontam import eval_images, phash
from psdclip.pipeline.subsets import SubsetRule, member_keys


def _smooth(seed, size=96):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC)


def test_planted_copies_are_left_out_by_reason(synth_dir, tmp_path):
    evals = tmp_path / "eval" / "cls"
    evals.mkdir(parents=True)
    for i in range(10):
        _smooth(100 + i).save(evals / f"{i}.jpg", quality=95)
    web = tmp_path / "web"
    web.mkdir()
    attrs = pd.read_parquet(synth_dir / "attributes.parquet").iloc[:60]
    plants = {}
    for i in range(3):  # the very files
        plants[f"exact{i}.jpg"] = (evals / f"{i}.jpg").read_bytes()
    for i in range(3, 6):  # resized
        buf = io.BytesIO()
        Image.open(evals / f"{i}.jpg").resize((140, 140), Image.LANCZOS).save(buf, "JPEG", quality=90)
        plants[f"resized{i}.jpg"] = buf.getvalue()
    for i in range(6, 8):  # re-encoded
        buf = io.BytesIO()
        Image.open(evals / f"{i}.jpg").save(buf, "PNG")
        plants[f"reencoded{i}.png"] = buf.getvalue()
    for i in range(8, 10):  # flipped
        buf = io.BytesIO()
        Image.open(evals / f"{i}.jpg").transpose(Image.FLIP_LEFT_RIGHT).save(buf, "JPEG", quality=92)
        plants[f"flipped{i}.jpg"] = buf.getvalue()
    for name, data in plants.items():
        (web / name).write_bytes(data)
    for k in range(10):  # images like the evaluation's, but others
        _smooth(500 + k).save(web / f"other{k}.jpg")
    with Server(str(synth_dir)) as srv, Server(str(web)) as plant_srv:
        rows = [(srv.base + "/img/" + p, c) for p, c in zip(attrs["path"], attrs["caption"])]
        rows += [(plant_srv.base + "/img/" + n, f"planted {n}") for n in plants]
        rows += [(plant_srv.base + f"/img/other{k}.jpg", f"other {k}") for k in range(10)]
        pd.DataFrame(rows, columns=["url", "caption"]).to_csv(tmp_path / "urls.csv", index=False)
        ds = tmp_path / "ds"
        build(cfg([tmp_path / "urls.csv"], ds, subsets=["1.0"]))
    m = pd.read_parquet(ds / "manifest")
    assert (m["status"] == "success").sum() == 80
    r = cli("data", "subset", ds, "--name", "clean", "--exclude-near", tmp_path / "eval")
    assert "3 exact and 7 near copies" in r.stdout
    doc = json.load(open(ds / "subsets" / "clean.json"))
    assert doc["exclude"]["exact"] == 3 and doc["exclude"]["near"] == 7 and doc["count"] == 70
    planted = set(m.loc[m["caption"].str.startswith("planted"), "key"])
    assert set(doc["exclude"]["keys"]) == planted
    members = member_keys(str(ds), SubsetRule.of(doc, str(ds)))
    assert not members & planted and len(members) == 70
    stats = cli("data", "stats", ds).stdout
    assert "left out: 3 exact, 7 near copies" in stats
    # the same evaluation images in CLIP_benchmark's webdataset layout (wds_*/test/0.tar: the very bytes, with cls)
    wds = tmp_path / "wds_eval"
    (wds / "test").mkdir(parents=True)
    with tarfile.open(wds / "test" / "0.tar", "w") as t:
        for i in range(10):
            for ext, data in (("jpg", (evals / f"{i}.jpg").read_bytes()), ("cls", b"0")):
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    (wds / "classnames.txt").write_text("blob\n")
    r = cli("data", "subset", ds, "--name", "clean-wds", "--exclude-near", wds)
    assert "3 exact and 7 near copies" in r.stdout
    assert set(json.load(open(ds / "subsets" / "clean-wds.json"))["exclude"]["keys"]) == planted
    with tarfile.open(wds / "test" / "0.tar", "w") as t:  # no image in the layout: one line, nothing written
        info = tarfile.TarInfo("s0000.cls")
        info.size = 1
        t.addfile(info, io.BytesIO(b"0"))
    r = cli("data", "subset", ds, "--name", "clean-none", "--exclude-near", wds, check=False)
    assert r.returncode == 2 and "no images there" in r.stderr and not (ds / "subsets" / "clean-none.json").exists()
    (wds / "test" / "0.tar").write_bytes(b"not a tar")  # a broken shard: one line naming the layout
    r = cli("data", "subset", ds, "--name", "clean-none", "--exclude-near", wds, check=False)
    assert r.returncode == 2 and "could not be read" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (ds / "subsets" / "clean-none.json").exists()
    # the trainer reads the clean subset; inside a size subset too
    cli("train", "--data", ds / "subsets" / "clean.json", "--out", tmp_path / "run", "--model", "rn-small",
        "--batch-size", 16, "--steps", 2, "--workers", 0, "--no-progress")
    cli("data", "subset", ds, "--name", "clean-all", "--within", "100pct", "--exclude-near", tmp_path / "eval",
        "--max-hamming", "0")
    strict = json.load(open(ds / "subsets" / "clean-all.json"))
    assert strict["exclude"]["exact"] == 3 and strict["exclude"]["near"] <= 7


def test_phash_and_evaluation_sets(synth_dir, tmp_path):
    a, b = _smooth(1), _smooth(2)
    assert bin(phash(a) ^ phash(a.resize((50, 50)))).count("1") <= 4
    assert bin(phash(a) ^ phash(b)).count("1") > 12
    held = eval_images(str(synth_dir))  # a synthetic source: its held-out renderings
    assert held and all("heldout" in p for p in held) and len(held) == 40 * 6
    lst = tmp_path / "r.csv"
    a.save(tmp_path / "x.jpg")
    pd.DataFrame({"image": ["x.jpg"], "caption": ["c"]}).to_csv(lst, index=False)
    assert eval_images(str(lst)) == [os.path.join(str(tmp_path), "x.jpg")]
