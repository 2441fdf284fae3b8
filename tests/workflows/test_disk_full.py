"""A full disk, for real (a size-limited tmpfs mounted for the test): `data build`, `train` and `index build` end with
one line naming the folder and the space free there, exit 1, and what was written before is intact."""
import contextlib
import os
import subprocess

import pytest

from helpers.cli import psdclip


@contextlib.contextmanager
def small_disk(path, size):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _one_line(r):
    lines = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) < 15, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("psdclip: error: ") and "no space left" in lines[0], lines
    assert "MB free there" in lines[0]
    return lines[0]


def test_a_full_disk_is_one_line_in_every_stage(synth_urls, dataset_dir, runs, tmp_path):
    with small_disk(tmp_path / "disk", "600k") as disk:
        # data build: the shards do not fit (the state files do)
        r = psdclip("data", "build", synth_urls, "--out", disk / "ds", "--image-size", "64", "--shard-size", "100",
                    "--no-progress", "--processes-count", "1", check=False, timeout=600)
        assert str(disk) in _one_line(r)
        # train: a checkpoint of the small model does not fit
        r = psdclip("train", "--data", dataset_dir, "--out", disk / "run", "--steps", "2", "--batch-size", "32",
                    "--workers", "0", "--no-progress", check=False, timeout=600)
        assert str(disk / "run") in _one_line(r)
        # index build: embeddings and index do not fit, the run it reads is untouched
        before = sorted(os.listdir(runs[0] / "checkpoints"))
        (disk / "filler").write_bytes(b"\0" * 1)
        r = psdclip("index", "build", "--checkpoint", runs[0], "--data", dataset_dir, "--out", disk / "idx",
                    "--no-progress", "--workers", "0", check=False, timeout=600)
        _one_line(r)
        assert sorted(os.listdir(runs[0] / "checkpoints")) == before
