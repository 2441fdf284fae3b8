"""The same command from an empty folder gives the same numbers: two builds of one URL list write the same samples
in the same order (img2dataset's threads finish in any order), and two trainings of the same data and seed log the
same losses and evaluate the same."""
import json
import tarfile

import pandas as pd

from helpers.cli import cli


def _samples(ds):
    out = []
    for shard in sorted((ds / "shards").glob("*.tar")):
        with tarfile.open(shard) as t:
            out.append([(m.name, m.size) for m in t.getmembers()])
    return out


def test_two_builds_and_two_trainings_give_the_same_samples_and_numbers(synth_dir, synth_urls, tmp_path):
    runs = []
    for name in ("a", "b"):
        ds = tmp_path / name / "dataset"
        cli("data", "build", synth_urls, "--out", ds, "--image-size", 32, "--shard-size", 100, "--thread-count", 16,
            "--processes-count", 2, "--no-progress")
        run = tmp_path / name / "run"
        cli("train", "--data", ds, "--out", run, "--model", "rn-small", "--batch-size", 32, "--steps", 12,
            "--log-every", 1, "--workers", 1, "--threads", 1, "--seed", 3, "--loss", "psd", "--alpha-start", "0.5",
            "--teacher-temperature", "2", "--no-progress")
        result = json.loads(cli("eval", run, "--suite", f"synthetic:{synth_dir}", "--json", "--workers", 0).stdout)
        runs.append((ds, run, result["metrics"]))
    (da, ra, ea), (db, rb, eb) = runs
    assert _samples(da) == _samples(db) and sum(len(s) for s in _samples(da)) > 600
    cols = ["key", "url", "status", "shard", "offset", "size", "sha256"]
    ma = pd.read_parquet(da / "manifest", columns=cols).sort_values("key").reset_index(drop=True)
    mb = pd.read_parquet(db / "manifest", columns=cols).sort_values("key").reset_index(drop=True)
    pd.testing.assert_frame_equal(ma, mb)
    # the offsets the manifest records are where each image lies in its rewritten shard
    row = ma[ma["status"] == "success"].iloc[-1]
    with tarfile.open(da / "shards" / f"{int(row['shard']):05d}.tar") as t:
        member = t.getmember(f"{row['key']}.jpg")
        assert member.offset_data == row["offset"] and member.size == row["size"]
    la = [json.loads(x)["loss"] for x in open(ra / "metrics.jsonl")]
    lb = [json.loads(x)["loss"] for x in open(rb / "metrics.jsonl")]
    assert len(la) == 12 and max(abs(x - y) for x, y in zip(la, lb)) < 1e-5
    for k in ("zeroshot_shape_base.top1", "retrieval.mean_R@1", "linear_probe_shape.accuracy"):
        assert abs(ea[k] - eb[k]) < 1e-6, k
