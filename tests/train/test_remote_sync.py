"""--remote-sync (open_clip's flag) against a real S3-compatible server on loopback (moto's server mode): a run's
checkpoints, metrics and plots are copied as they are written, and a run on a "new machine" (an empty --out)
resumes from the remote copy; a partial upload never becomes the latest."""
import json
import os

import pytest

from helpers.cli import cli
from helpers.s3 import moto_s3

FAST = ["--model", "rn-small", "--batch-size", "16", "--workers", "0", "--shuffle-buffer", "32", "--warmup", "1",
        "--no-progress", "--log-every", "1", "--checkpoint-every", "2"]


@pytest.fixture()
def bucket(monkeypatch):
    from s3fs import S3FileSystem

    with moto_s3(monkeypatch):
        fs = S3FileSystem(skip_instance_cache=True)
        fs.mkdir("runs")
        yield fs


def test_a_run_syncs_to_s3_and_a_new_machine_resumes_from_it(bucket, dataset_dir, tmp_path):
    url = "s3://runs/exp1"
    first = tmp_path / "machine-a"
    cli("train", "--data", dataset_dir, "--out", first, "--steps", 6, "--stop-after", 4, "--remote-sync", url, *FAST)
    bucket.invalidate_cache()
    names = sorted(os.path.basename(p) for p in bucket.ls("runs/exp1/checkpoints"))
    assert names == ["latest", "step_000002.pt", "step_000004.pt"]
    assert bucket.cat("runs/exp1/checkpoints/latest").decode() == "step_000004.pt"
    assert bucket.cat("runs/exp1/checkpoints/step_000004.pt") == (first / "checkpoints" / "step_000004.pt").read_bytes()
    assert bucket.exists("runs/exp1/metrics.jsonl") and bucket.exists("runs/exp1/config_history.jsonl")
    assert any(p.endswith(".png") for p in bucket.ls("runs/exp1/plots"))
    # an upload cut short (a temporary object left behind) is never taken for the latest, and is cleared
    bucket.pipe("runs/exp1/checkpoints/step_000008.pt.tmp-deadbeef", b"partial")

    second = tmp_path / "machine-b"  # nothing of the run on this machine
    r = cli("train", "--data", dataset_dir, "--out", second, "--steps", 6, "--remote-sync", url, *FAST)
    assert "resuming from the remote copy" in r.stderr and "(step 4)" in r.stderr
    rows = [json.loads(line) for line in open(second / "metrics.jsonl")]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]  # the remote metrics, then this machine's
    bucket.invalidate_cache()
    assert bucket.cat("runs/exp1/checkpoints/latest").decode() == "step_000006.pt"
    left = sorted(os.path.basename(p) for p in bucket.ls("runs/exp1/checkpoints"))
    assert left == ["latest", "step_000002.pt", "step_000004.pt", "step_000006.pt"]  # --keep 3 of either side's
    assert not [p for p in bucket.find("runs/exp1") if ".tmp-" in p]

    bad = cli("train", "--data", dataset_dir, "--out", tmp_path / "c", "--steps", 2, "--remote-sync",
              "nosuchproto://x/y", *FAST, check=False)
    lines = [ln for ln in bad.stderr.splitlines() if ln.startswith("psdclip: error")]
    assert bad.returncode == 2 and len(lines) == 1 and "--remote-sync nosuchproto://x/y" in lines[0]
