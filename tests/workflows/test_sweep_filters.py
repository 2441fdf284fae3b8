"""The filter axis of a sweep (issue 28.5): a scorer run of the sweep scores the dataset, each filter is written as
a subset inside every pool size, every method trains on each, and the report pairs each filter with no filter at
the same pool."""
import json

import pandas as pd
import yaml

from helpers.cli import cli


def _recipe(tmp_path, scheduler, **filters):
    return {
        "name": "filters", "out": str(tmp_path / "study"),
        "synthetic": {"n": 200, "heldout": 24, "seed": 3, "image_size": 32, "mismatch_frac": 0.5},
        "data": {"image_size": 32, "shard_size": 50, "thread_count": 8, "dask_scheduler": scheduler},
        "train": {"model": "tiny", "batch_size": 16, "workers": 0, "warmup": 1},
        "sweep": {"subsets": ["0.5", "1.0"], "seeds": [0], "seeds_largest": [0, 1], "runner": "inprocess",
                  "prune": True, "compute": {"rule": "samples_seen", "samples": 48}, "suites": ["synthetic"],
                  "metrics": ["retrieval.mean_R@1"], "methods": {"clip": {"loss": "clip"}},
                  "scorer": {"method": "clip", "subset": "1.0", "seed": 0},
                  "filters": filters or {"top50": {"top_fraction": 0.5}, "top30": {"top_fraction": 0.3}}},
    }


def test_sweep_filter_axis_scores_filters_trains_and_reports(tmp_path, scheduler):
    recipe = _recipe(tmp_path, scheduler)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(recipe))
    assert "6 subsets (2 filter(s) in each size)" in cli("sweep", tmp_path / "s.yaml", "--check").stdout
    first = cli("sweep", tmp_path / "s.yaml")
    assert first.stderr.count("[sweep] scoring") == 1
    out = tmp_path / "study"
    dataset = out / "dataset"
    scores = dataset / "scores" / "scorer-100pct-clip-s0"
    all_scores = pd.concat([pd.read_parquet(f) for f in scores.glob("shard-*.parquet")])["clip_score"].to_numpy("float64")
    total = len(all_scores)
    assert total == 200 and json.load(open(out / "scorer.json"))["scores"] == "scorer-100pct-clip-s0"
    assert not (out / "runs" / "100pct-clip-s0" / "checkpoints").exists()  # pruned once it had scored
    table = pd.read_csv(out / "results.csv", keep_default_na=False)
    assert set(table["filter"]) == {"", "top50", "top30"} and len(table) == 3 * (1 + 2)
    for pool, n_pool in (("50pct", 100), ("100pct", 200)):
        for fname, frac in (("top50", 0.5), ("top30", 0.3)):
            doc = json.load(open(dataset / "subsets" / f"{pool}-{fname}.json"))
            assert doc["within"] == pool and doc["of_total"] == n_pool
            assert abs(doc["count"] - round(frac * n_pool)) <= 2  # the histogram's threshold, ties aside
            rows = table[(table["pool"] == pool) & (table["filter"] == fname)]
            assert set(rows["N"]) == {doc["count"]} and set(rows["pool_N"]) == {n_pool}
            if pool == "100pct":  # the whole dataset: the kept are exactly the samples scoring at least the threshold
                assert (all_scores >= doc["score"]["min"]).sum() == doc["count"]
        run = out / "runs" / f"{pool}-top30-clip-s0"
        assert yaml.safe_load(open(run / "train.yaml"))["data"].endswith(f"subsets/{pool}-top30.json")
    report = (out / "results.md").read_text()
    assert "| clip [top30] |" in report and "Each filter minus no filter" in report
    assert "| 200 | clip | top50 |" in report and (out / "diff_filter_retrieval_mean_R1.png").exists()
    again = cli("sweep", tmp_path / "s.yaml")
    assert "[sweep] scoring" not in again.stderr and again.stderr.count("done, skipped") == 9
    # --report gathers what has finished and trains nothing (a study spanning sessions)
    (out / "runs" / "50pct-top30-clip-s0" / "eval" / "synthetic.json").unlink()
    partial = cli("sweep", tmp_path / "s.yaml", "--report")
    assert " steps" not in partial.stderr and "[sweep] scoring" not in partial.stderr
    assert not (out / "runs" / "50pct-top30-clip-s0" / "eval" / "synthetic.json").exists()
    assert len(pd.read_csv(out / "results.csv")) == 8
    assert "1 not yet (50pct-top30-clip-s0)" in (out / "results.md").read_text()


def test_sweep_filter_refuses_a_changed_rule_and_bad_filters(tmp_path, scheduler):
    recipe = _recipe(tmp_path, scheduler, top50={"top_fraction": 0.5})
    recipe["sweep"]["subsets"] = ["1.0"]
    recipe["sweep"]["seeds_largest"] = [0]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(recipe))
    cli("sweep", tmp_path / "s.yaml")
    recipe["sweep"]["filters"]["top50"] = {"top_fraction": 0.6}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(recipe))
    r = cli("sweep", tmp_path / "s.yaml", check=False)
    assert r.returncode == 2 and "100pct-top50.json: this subset was made from other scores, rule or pool" in r.stderr
    for bad, message in (({"x": {"top_fraction": 1.5}}, "top_fraction must be in (0, 1]"),
                         ({"x": {"top_frac": 0.5}}, "unknown key(s) top_frac"),
                         ({"x": {"top_fraction": 0.5, "min_score": 0.1}}, "not both")):
        recipe["sweep"]["filters"] = bad
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(recipe))
        r = cli("sweep", tmp_path / "bad.yaml", "--check", check=False)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    del recipe["sweep"]["scorer"]
    recipe["sweep"]["filters"] = {"x": {"top_fraction": 0.5}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(recipe))
    r = cli("sweep", tmp_path / "bad.yaml", "--check", check=False)
    assert r.returncode == 2 and "a score rule needs sweep.scorer" in r.stderr
