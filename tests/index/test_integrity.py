"""What is indexed, served or written is what it claims to be: one writer per output folder, names that stay inside,
the checkpoint and the dataset an index names checked at every open, and every shard format with every image encoding
read back by the trainer, the index and the image endpoint."""
import io
import json
import os
import shutil

import pytest
import requests
from PIL import Image

from psdclip.core.locks import folder_lock
from psdclip.pipeline.build import build
from psdclip.pipeline.format import image_of
from psdclip.pipeline.reader import read_image_bytes, shard_samples, success_rows

from helpers.cli import cli
from helpers.datasets import cfg
from helpers.service import start_service


@pytest.fixture(scope="module")
def own(dataset_dir, runs, tmp_path_factory):
    """This module's own copies of a dataset and a checkpoint (the tests replace them), and an index of the two."""
    root = tmp_path_factory.mktemp("integrity")
    shutil.copytree(dataset_dir, root / "ds", symlinks=True)
    ckpt = root / "model.pt"
    shutil.copyfile(sorted((runs[0] / "checkpoints").glob("step_*.pt"))[-1], ckpt)
    cli("index", "build", "--checkpoint", ckpt, "--data", root / "ds", "--out", root / "idx", "--no-progress",
        "--workers", 0)
    return root


def _listing(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


@pytest.mark.parametrize("name", ["../manifest", "../../x", "a/b", "..", ".hidden", "x" * 101])
def test_names_that_become_paths_stay_one_name_inside(own, runs, name):
    """--name of data score and data subset is one folder or file name: `../manifest` wrote into the manifest folder
    (every later index build refused the dataset) and `../../x` outside the dataset."""
    before = _listing(own)
    for args in (["data", "score", own / "ds", "--checkpoint", runs[0], "--name", name, "--no-progress"],
                 ["data", "subset", own / "ds", "--name", name, "--exclude-near", own / "ds"]):
        r = cli(*args, check=False)
        assert r.returncode == 2 and "--name" in r.stderr and "no path" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert _listing(own) == before  # nothing written anywhere


def test_one_writer_per_output_folder(own, runs, tmp_path):
    """While another process writes an output folder, a second index build, data score, data subset, export or
    import into it is one line naming the holder, and writes nothing (two index builds into one folder used to
    publish vectors of two checkpoints under one index.json)."""
    ds = own / "ds"
    cases = [
        (tmp_path / "idx" / "index.lock", ["index", "build", "--checkpoint", runs[1], "--data", ds, "--out",
                                           tmp_path / "idx", "--no-progress", "--workers", 0], "index build"),
        (ds / "scores" / "s1" / "score.lock", ["data", "score", ds, "--checkpoint", runs[1], "--name", "s1",
                                               "--no-progress", "--workers", 0], "data score"),
        (ds / "_state" / "subset-near.lock", ["data", "subset", ds, "--name", "near", "--exclude-near", ds],
         "data subset"),
        (tmp_path / "out" / ".m.pt.lock", ["export", runs[1], "--out", tmp_path / "out" / "m.pt"], "export"),
    ]
    for lock, args, command in cases:
        with folder_lock(str(lock), "held by the test"):
            r = cli(*args, check=False)
        assert r.returncode == 2 and f"another `psdclip {command}`" in r.stderr, (command, r.stderr)
        assert f"pid {os.getpid()}" in r.stderr  # the holder, named
    assert not (tmp_path / "idx" / "index.json").exists() and not (ds / "scores" / "s1" / "score.json").exists()
    assert not (ds / "subsets" / "near.json").exists() and not (tmp_path / "out" / "m.pt").exists()
    # the lock taken, the same commands run (the folders they made for nothing are gone again)
    assert cli("export", runs[1], "--out", tmp_path / "out" / "m.pt").returncode == 0
    r = cli("index", "build", "--checkpoint", runs[1], "--data", ds, "--out", tmp_path / "idx2", "--factory",
            "NoSuchIndex", check=False)
    assert r.returncode == 2 and not (tmp_path / "idx2").exists()


def test_a_replaced_checkpoint_is_refused_at_every_open(own, runs):
    """An index checks its checkpoint's sha256 when it opens it: a different file at the recorded path (index query,
    serve) is one line, not different answers."""
    ok = cli("index", "query", own / "idx", "--text", "a red circle", "-k", 3)
    assert ok.returncode == 0
    saved = own / "model.saved"
    shutil.copyfile(own / "model.pt", saved)
    try:
        shutil.copyfile(sorted((runs[2] / "checkpoints").glob("step_*.pt"))[-1], own / "model.pt")
        r = cli("index", "query", own / "idx", "--text", "a red circle", "-k", 3, check=False)
        assert r.returncode == 2 and "not the one the index was built with" in r.stderr, r.stderr
        r = cli("serve", own / "idx", "--workers", 2, "--port", 0, check=False)
        assert r.returncode == 2 and "not the one the index was built with" in r.stderr, r.stderr
    finally:
        shutil.copyfile(saved, own / "model.pt")
    assert cli("index", "query", own / "idx", "--text", "a red circle", "-k", 3).stdout == ok.stdout


def test_images_of_a_rebuilt_dataset_are_never_served(own):
    """/images/{key} reads a stored image by the offset the index recorded: from a dataset rebuilt in place (a new
    id) it answers 409 saying so, never bytes from elsewhere in a shard (a tar header served as image/jpeg)."""
    meta = own / "ds" / "dataset.json"
    key = success_rows(str(own / "ds"))[0]["key"].iloc[0]
    proc, base = start_service(own / "idx")
    try:
        r = requests.get(f"{base}/images/{key}", timeout=30)
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        Image.open(io.BytesIO(r.content)).verify()
        doc = json.loads(meta.read_text())
        saved = meta.read_text()
        meta.write_text(json.dumps({**doc, "id": "rebuilt-in-place"}))
        try:
            r = requests.get(f"{base}/images/{key}", timeout=30)
            assert r.status_code == 409 and "not the dataset this index was built from" in r.text, r.text
        finally:
            meta.write_text(saved)
        assert requests.get(f"{base}/images/{key}", timeout=30).status_code == 200
        shard = sorted((own / "ds" / "shards").glob("*.tar"))[0]  # a shard replaced in place (same id): refused too
        st = os.stat(shard)
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        keys = success_rows(str(own / "ds"))[0]
        in_first = keys[keys["shard"] == int(shard.name[:5])]["key"].iloc[0]
        try:
            r = requests.get(f"{base}/images/{in_first}", timeout=30)
            assert r.status_code == 409 and "replaced since this index was built" in r.text, r.text
        finally:
            os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert requests.get(f"{base}/images/{in_first}", timeout=30).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("fmt", ["arrow", "webdataset"])
@pytest.mark.parametrize("encode", ["png", "webp"])
def test_every_shard_format_and_encoding_is_read_back(synth_urls, scheduler, runs, tmp_path, fmt, encode):
    """Every combination build accepts is read by the shard reader (train's and index's), the image endpoint's
    one-image read, and index build (Arrow with png or webp was written but unreadable: the reader assumed a jpg
    column; png with the default quality failed every shard)."""
    out = tmp_path / "ds"
    build(cfg([synth_urls], out, format=fmt, encode_format=encode, dask_scheduler=scheduler, shard_size=100))
    rows, _ = success_rows(str(out))
    assert len(rows) >= 250
    sig = {"png": b"\x89PNG", "webp": b"RIFF"}[encode]
    first = rows.iloc[0]
    data = read_image_bytes(str(out), fmt, int(first["shard"]), int(first["offset"]), int(first["size"]))
    assert data.startswith(sig)
    seen = 0
    for sample in shard_samples(str(out), fmt, int(first["shard"]), on_error=pytest.fail):
        with Image.open(io.BytesIO(image_of(sample))) as im:
            assert im.size == (32, 32)
        seen += 1
    assert seen == int((rows["shard"] == first["shard"]).sum())
    r = cli("index", "build", "--checkpoint", runs[0], "--data", out, "--out", tmp_path / "idx", "--no-progress",
            "--workers", 0)
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["count"] == len(rows), r.stdout


def test_damaged_shards_fail_the_index_build_and_their_parts_are_never_reused(own, runs, tmp_path):
    """A shard whose images cannot all be read ends `index build` with exit 1 naming it (it gave a partial index
    with exit 0: 12 of 600 images); --skip-damaged indexes what is readable; once the shard is repaired, a rerun
    embeds it again whole instead of reusing the partial part."""
    ds = tmp_path / "ds"
    shutil.copytree(own / "ds", ds, symlinks=True)
    rows, fmt = success_rows(str(ds))
    shard = sorted((ds / "shards").glob("*.tar"))[1]
    whole = shard.read_bytes()
    first = rows[rows["shard"] == int(shard.name[:5])].iloc[3]
    damaged = bytearray(whole)  # one image's bytes overwritten, and the tar cut short after the tenth image
    damaged[int(first["offset"]):int(first["offset"]) + int(first["size"])] = b"\0" * int(first["size"])
    cut = int(rows[rows["shard"] == int(shard.name[:5])].iloc[10]["offset"]) + 100
    shard.write_bytes(bytes(damaged[:cut]))
    args = ["index", "build", "--checkpoint", runs[0], "--data", ds, "--out", tmp_path / "idx", "--no-progress",
            "--workers", 0]
    r = cli(*args, check=False)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("psdclip: error")]
    assert r.returncode == 1 and len(errors) == 1 and f"shard {shard.name[:5]}" in errors[0], r.stderr[-2000:]
    assert not (tmp_path / "idx" / "index.json").exists()
    assert cli(*args, "--skip-damaged").returncode == 0
    partial = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert partial["count"] < len(rows) and partial["undecodable_images"] >= 1
    shard.write_bytes(whole)  # repaired
    assert cli(*args).returncode == 0
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["count"] == len(rows)
