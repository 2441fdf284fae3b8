"""The same command from an empty folder gives the same numbers: two builds of one URL list write the same samples
in the same order (img2dataset's threads finish in any order), and two trainings of the same data and seed log the
same losses and evaluate the same. The sources are generated and served from two different folders, as two clones
would: a source's stable port comes from what it is, not where it lies, so the URLs, the keys (hashes of the URLs)
and the shards (rows dealt by key) are the same."""
import json
import socket
import tarfile

import pandas as pd

from helpers.cli import cli


def _samples(ds):
    out = []
    for shard in sorted((ds / "shards").glob("*.tar")):
        with tarfile.open(shard) as t:
            out.append([(m.name, m.size) for m in t.getmembers()])
    return out


def _source(folder, seed):
    from psdclip.pipeline.config import SynthConfig
    from psdclip.pipeline.synth import generate

    generate(SynthConfig(out=str(folder), n=300, seed=seed, heldout=40, image_size=64), progress=False)
    return folder


def _free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_the_same_source_in_two_folders_is_served_at_the_same_urls(tmp_path):
    from psdclip.pipeline.serve import stable_port

    a, b = _source(tmp_path / "a", 3), _source(tmp_path / "elsewhere" / "b", 3)
    assert stable_port(str(a)) == stable_port(str(b))
    assert stable_port(str(_source(tmp_path / "c", 4))) != stable_port(str(a))  # another source, another port
    assert stable_port(str(tmp_path)) != stable_port(str(tmp_path / "d"))  # a plain folder: its path


def test_two_builds_and_two_trainings_give_the_same_samples_and_numbers(tmp_path):
    from psdclip.pipeline.serve import serving, stable_port
    from psdclip.pipeline.synth import write_url_list

    # a seed whose source's stable port nothing on this machine holds now
    seed = next(s for s in range(3, 40) if _free(stable_port(str(_source(tmp_path / f"probe{s}", s)))))
    runs = []
    for name in ("a", "b"):
        synth_dir = _source(tmp_path / name / "synth", seed)  # a fresh folder each time, as a fresh clone
        with serving(str(synth_dir)) as base:
            assert base.endswith(f":{stable_port(str(synth_dir))}")
            urls = write_url_list(str(synth_dir), base)
            ds = tmp_path / name / "dataset"
            cli("data", "build", urls, "--out", ds, "--image-size", 32, "--shard-size", 100, "--thread-count", 16,
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
