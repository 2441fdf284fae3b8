"""`psdclip sweep RECIPE --methods A,B` trains only those methods' runs and gathers the others' finished runs, so
one sweep can be split over processes (or GPUs, or machines sharing its folder), a method set each."""
import pandas as pd
import yaml

from helpers.cli import cli


def test_methods_trains_only_its_methods_and_reports_the_rest(tmp_path, scheduler):
    recipe = {
        "name": "split", "out": str(tmp_path / "study"),
        "synthetic": {"n": 160, "heldout": 24, "seed": 3, "image_size": 32},
        "data": {"image_size": 32, "shard_size": 80, "thread_count": 8, "dask_scheduler": scheduler},
        "train": {"model": "tiny", "batch_size": 16, "workers": 0, "warmup": 1},
        "sweep": {"subsets": ["1.0"], "seeds": [0], "runner": "inprocess", "prune": True,
                  "compute": {"rule": "samples_seen", "samples": 32}, "suites": ["synthetic"],
                  "metrics": ["retrieval.mean_R@1"], "regime": {"method": "clip", "seed": 0, "require": {}},
                  "methods": {"clip": {"loss": "clip"}, "psd-T2": {"loss": "psd", "teacher_temperature": 2.0}}},
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(recipe))
    runs = tmp_path / "study" / "runs"
    # the regime run has not finished: a split sweep refuses to start (two processes would both train it)
    early = cli("sweep", path, "--methods", "psd-T2", check=False)
    assert early.returncode == 2 and "the regime run (clip seed 0 at 100pct) has not finished" in early.stderr
    assert not (runs / "100pct-psd-T2-s0").exists()
    bad = cli("sweep", path, "--methods", "psd-T2,nope", check=False)
    assert bad.returncode == 2 and "--methods nope: not a method of" in bad.stderr and "psd-T2" in bad.stderr
    # the full sweep once, then a split rerun after removing one method's run
    cli("sweep", path)
    table = pd.read_csv(tmp_path / "study" / "results.csv")
    assert set(table["method"]) == {"clip", "psd-T2"}
    import shutil

    shutil.rmtree(runs / "100pct-psd-T2-s0")
    shutil.rmtree(runs / "100pct-clip-s0" / "eval")  # clip's run is unfinished now (no evaluation)
    only = cli("sweep", path, "--methods", "psd-T2", check=False)
    # the regime run is clip's, unfinished: refused again, nothing trained
    assert only.returncode == 2 and "has not finished" in only.stderr and not (runs / "100pct-psd-T2-s0").exists()
    recipe["sweep"].pop("regime")
    path.write_text(yaml.safe_dump(recipe))
    # another process of the sweep serves the source on its port: a complete dataset is not served (or built) again
    import socket
    from urllib.parse import urlsplit

    listed = tmp_path / "study" / "synth" / "urls-recipe.csv"
    port = urlsplit(pd.read_csv(listed)["url"].iloc[0]).port
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", port))
        held.listen()
        only = cli("sweep", path, "--methods", "psd-T2")
    assert "psd-T2 seed 0" in only.stderr and (runs / "100pct-psd-T2-s0" / "eval" / "synthetic.json").exists()
    assert not (runs / "100pct-clip-s0" / "eval").exists()  # clip's run was gathered, not trained or evaluated
    assert "1 not yet (100pct-clip-s0)" in (tmp_path / "study" / "results.md").read_text()
    assert set(pd.read_csv(tmp_path / "study" / "results.csv")["method"]) == {"psd-T2"}


def test_the_sweep_only_options_are_not_options_of_run():
    """--report and --methods belong to `psdclip sweep`; `psdclip run` (one recipe end to end) would have
    accepted them and done nothing with them: it refuses them as unknown options."""
    for flag in ("--report", "--methods=clip"):
        r = cli("run", "demo", flag, check=False)
        assert r.returncode == 2 and "unrecognized arguments" in r.stderr and flag.split("=")[0] in r.stderr, r.stderr
        assert flag.split("=")[0] in cli("sweep", "--help").stdout
