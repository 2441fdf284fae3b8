"""psdclip data import: the output of a real img2dataset run (the installed package, on a loopback list with failing
rows and a repeated image) becomes a psdclip dataset that trains, indexes and serves images, without a download."""
import json
import os
import subprocess
import sys
import tarfile

import pandas as pd
import pytest

from helpers.cli import cli

from psdclip.pipeline.reader import read_image_bytes


def _img2dataset(urls, out, fmt, encode="jpg"):
    code = (f"from img2dataset import download\n"
            f"download(url_list={str(urls)!r}, output_folder={str(out)!r}, output_format={fmt!r}, input_format='csv', "
            f"encode_format={encode!r}, encode_quality={95 if encode != 'png' else 3}, "
            f"url_col='url', caption_col='caption', image_size=32, thread_count=8, processes_count=1, "
            f"number_sample_per_shard=25, timeout=2, retries=0, distributor='multiprocessing')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def lists(tmp_path_factory, synth_dir):
    from helpers.servers import Server

    attrs = pd.read_parquet(synth_dir / "attributes.parquet").iloc[:60]
    tmp = tmp_path_factory.mktemp("i2d")
    with Server(str(synth_dir)) as srv:
        rows = [(srv.base + "/img/" + p, c) for p, c in zip(attrs["path"], attrs["caption"])]
        rows += [(srv.base + f"/bad/{k}-404.jpg", "missing") for k in range(5)]
        rows.append((rows[0][0], "the first image again"))
        pd.DataFrame(rows, columns=["url", "caption"]).to_csv(tmp / "urls.csv", index=False)
        _img2dataset(tmp / "urls.csv", tmp / "wds", "webdataset")
        _img2dataset(tmp / "urls.csv", tmp / "pq", "parquet")
        _img2dataset(tmp / "urls.csv", tmp / "pq-webp", "parquet", "webp")
    return tmp


@pytest.mark.parametrize("fmt", ["wds", "pq"])
def test_img2dataset_output_becomes_a_dataset(lists, tmp_path, fmt):
    src = lists / fmt
    before = {p: os.stat(src / p).st_mtime_ns for p in os.listdir(src)}
    ds = tmp_path / "ds"
    out = cli("data", "import", src, "--out", ds, "--subsets", "0.5,1.0").stdout
    assert "imported 66 rows" in out
    m = pd.read_parquet(ds / "manifest")
    assert len(m) == 66 and m["key"].is_unique  # one row per input row
    counts = m["status"].value_counts().to_dict()
    assert counts == {"success": 60, "http_4xx": 5, "duplicate_image": 1}, counts
    assert set(m[m["status"] == "http_4xx"]["caption"]) == {"missing"}
    # the repeat (the last input row, three shards after the first) is the duplicate, not the first; by hash bucket
    dup = m[m["status"] == "duplicate_image"].iloc[0]
    assert dup["caption"] == "the first image again" and int(dup["shard"]) == int(m["shard"].max()) > 0
    assert not (ds / "_work").exists()
    info = json.load(open(ds / "dataset.json"))
    assert info["counts"]["success"] == 60 and info["config"]["imported_from"] == str(src)
    assert info["config"]["shards"] == ("hard-linked" if fmt == "wds" else "copied")
    assert json.load(open(ds / "subsets" / "50pct.json"))["count"] == 30
    # every success's image is where the manifest says (what /images/{key} reads)
    fmt_ds = info["output_format"]
    for row in m[m["status"] == "success"].sample(5, random_state=0).itertuples():
        data = read_image_bytes(str(ds), fmt_ds, int(row.shard), int(row.offset), int(row.size))
        assert data[:2] == b"\xff\xd8" and len(data) == row.size
        if fmt == "wds":
            with tarfile.open(src / f"{int(row.shard):05d}.tar") as t:
                assert t.extractfile(f"{row.key}.jpg").read() == data
    assert {p: os.stat(src / p).st_mtime_ns for p in os.listdir(src)} == before  # img2dataset's folder untouched
    # it trains and indexes
    run = tmp_path / "run"
    cli("train", "--data", ds / "subsets" / "100pct.json", "--out", run, "--model", "rn-small", "--batch-size", 16,
        "--steps", 3, "--workers", 0, "--no-progress")
    cli("index", "build", "--checkpoint", run, "--data", ds, "--out", tmp_path / "idx", "--workers", 1)
    assert json.load(open(tmp_path / "idx" / "index.json"))["count"] == 60
    # a build into it is refused in one line
    r = cli("data", "build", lists / "urls.csv", "--out", ds, check=False)
    assert r.returncode == 2 and "imported from img2dataset output" in r.stderr


def test_import_refuses_what_is_not_img2dataset_output(tmp_path):
    (tmp_path / "empty").mkdir()
    r = cli("data", "import", tmp_path / "empty", "--out", tmp_path / "ds", check=False)
    assert r.returncode == 2 and "not an img2dataset output folder" in r.stderr
    r = cli("data", "import", tmp_path / "nowhere", "--out", tmp_path / "ds", check=False)
    assert r.returncode == 2 and "no such folder" in r.stderr


def test_one_import_or_build_writes_a_dataset_at_a_time(lists, tmp_path):
    """data import takes the build's lock on --out: while another process holds it, an import is one line naming the
    holder and writes nothing; an --out with anything else in it is refused as before."""
    from psdclip.core.locks import folder_lock

    ds = tmp_path / "ds"
    with folder_lock(str(ds / "_state" / "build.lock"), "held"):
        r = cli("data", "import", lists / "wds", "--out", ds, check=False)
    assert r.returncode == 2 and "another `psdclip data import`" in r.stderr and f"pid {os.getpid()}" in r.stderr
    assert os.listdir(ds) == ["_state"] and os.listdir(ds / "_state") == ["build.lock"]
    assert "imported 66 rows" in cli("data", "import", lists / "wds", "--out", ds).stdout  # free: it runs
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    r = cli("data", "import", lists / "wds", "--out", tmp_path / "other", check=False)
    assert r.returncode == 2 and "not empty" in r.stderr


def test_an_img2dataset_parquet_of_webp_images_imports_and_reads_back(lists, tmp_path):
    """img2dataset names its parquet image column by the encode format: a webp folder imports with every success
    kept (the importer took the jpg column only) and its images read back as webp."""
    from PIL import Image

    ds = tmp_path / "ds"
    assert "imported 66 rows" in cli("data", "import", lists / "pq-webp", "--out", ds).stdout
    m = pd.read_parquet(ds / "manifest")
    ok = m[m["status"] == "success"]
    assert len(ok) >= 59, m["status"].value_counts()
    row = ok.iloc[0]
    data = read_image_bytes(str(ds), "arrow", int(row["shard"]), int(row["offset"]), int(row["size"]))
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    with Image.open(__import__("io").BytesIO(data)) as im:
        assert im.size == (32, 32)
