"""A full disk, for real (a size-limited tmpfs mounted for the test): `data build`, `train` and `index build` end with
one line naming the folder and the space free there, exit 1, and what was written before is intact."""
import contextlib
import os
import subprocess

import pytest



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
    """The three stages run at once, each on a small disk of its own (three processes: the suite's wall time)."""
    import sys

    bin_dir = os.path.dirname(sys.executable)

    def start(*args):
        return subprocess.Popen([os.path.join(bin_dir, "psdclip"), *map(str, args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def finish(p):
        out, err = p.communicate(timeout=600)
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    before = sorted(os.listdir(runs[0] / "checkpoints"))
    with small_disk(tmp_path / "d1", "600k") as d1, small_disk(tmp_path / "d2", "600k") as d2, \
            small_disk(tmp_path / "d3", "600k") as d3:
        (d3 / "filler").write_bytes(b"\0" * 1)
        procs = [
            # data build: the shards do not fit (the state files do); a worker that hangs is restarted well within
            # the test's time (a hang starting img2dataset's thread pool was seen here once)
            start("data", "build", synth_urls, "--out", d1 / "ds", "--image-size", "64", "--shard-size", "100",
                  "--no-progress", "--processes-count", "1", "--stall-timeout", "120"),
            # train: a checkpoint of the small model does not fit
            start("train", "--data", dataset_dir, "--out", d2 / "run", "--steps", "2", "--batch-size", "32",
                  "--workers", "0", "--no-progress"),
            # index build: embeddings and index do not fit, the run it reads is untouched
            start("index", "build", "--checkpoint", runs[0], "--data", dataset_dir, "--out", d3 / "idx",
                  "--no-progress", "--workers", "0"),
        ]
        build, train, index = (finish(p) for p in procs)
        assert str(d1) in _one_line(build)
        assert str(d2 / "run") in _one_line(train)
        _one_line(index)
        assert sorted(os.listdir(runs[0] / "checkpoints")) == before
