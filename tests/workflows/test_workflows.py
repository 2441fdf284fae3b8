"""Recipes, the real-data column layouts through the pipeline, a small sweep, and the demo."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from psdclip.pipeline.build import build
from psdclip.workflows.recipe import RECIPES, load_recipe, validate

from helpers.cli import cli, psdclip


@pytest.mark.parametrize("name", sorted(f[:-5] for f in os.listdir(RECIPES) if f.endswith(".yaml")))
def test_bundled_recipes_parse_and_validate(name, tmp_path):
    cfgs = validate(name, load_recipe(name), str(tmp_path))
    assert cfgs["data"].out.startswith(str(tmp_path))
    cmd = "sweep" if "sweep" in load_recipe(name) else "run"
    assert "valid" in cli(cmd, name, "--check").stdout


def test_bad_recipes_fail_with_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("train: {steps: -3}\nsynthetic: {n: 10}\n")
    r = cli("run", tmp_path / "bad.yaml", "--check", check=False)
    assert r.returncode == 2 and "--steps must be >= 1" in r.stderr
    (tmp_path / "bad2.yaml").write_text("data: {inputs: [x.csv]}\ntrian: {}\n")
    r = cli("run", tmp_path / "bad2.yaml", "--check", check=False)
    assert r.returncode == 2 and "unknown section(s) trian" in r.stderr


@pytest.mark.parametrize("name", ["cc3m", "cc12m", "yfcc15m"])
def test_real_column_layouts_go_through_the_pipeline(name, synth_dir, server, tmp_path, scheduler):
    """A 100-row file in the real layout of each data set, pointing at the loopback server."""
    attrs = pd.read_parquet(synth_dir / "attributes.parquet").head(100)
    urls = (server.base + "/img/" + attrs["path"]).tolist()
    caps = attrs["caption"].tolist()
    recipe = load_recipe(name)
    data = dict(recipe["data"])
    if name == "cc3m":
        path = tmp_path / "Train_GCC-training.tsv"
        path.write_text("".join(f"{c}\t{u}\n" for c, u in zip(caps, urls)))
    elif name == "cc12m":
        path = tmp_path / "cc12m.tsv"
        path.write_text("".join(f"{u}\t{c}\n" for u, c in zip(urls, caps)))
    else:
        path = tmp_path / "part-00000.parquet"
        pd.DataFrame({"photoid": range(100), "downloadurl": urls, "title": caps, "description": ""}).to_parquet(path)
    data.update(inputs=[str(path)], image_size=32, thread_count=8, shard_size=50, progress=False,
                dask_scheduler=scheduler)
    recipe["data"] = data
    cfgs = validate(name, recipe, str(tmp_path / "out"))
    stats = build(cfgs["data"])
    assert stats["rows"] == 100 and stats["success"] == 100


def test_small_sweep_fits_plots_and_resumes(tmp_path, scheduler):
    recipe = {
        "name": "tiny-sweep", "out": str(tmp_path / "sweep"),
        "synthetic": {"n": 300, "heldout": 30, "seed": 1, "image_size": 64},
        "data": {"image_size": 32, "shard_size": 100, "thread_count": 8, "dask_scheduler": scheduler},
        "train": {"model": "tiny", "batch_size": 16, "workers": 0, "warmup": 1},
        "sweep": {"subsets": ["0.2", "0.5", "1.0"], "methods": {"psd": {"loss": "psd"}}, "runner": "inprocess",
                  "seeds": [0], "compute": {"rule": "samples_seen", "samples": 32}, "suites": ["synthetic"],
                  "metrics": ["zeroshot_shape_base.top1", "retrieval.t2i_R@1"],
                  "chance": {"zeroshot_shape_base.top1": 0.1667}},
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(recipe))
    cli("sweep", tmp_path / "sweep.yaml")
    out = tmp_path / "sweep"
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 3 and sorted(table["N"].unique()) == [60, 150, 300] and set(table["steps"]) == {2}
    report = (out / "results.md").read_text()
    assert "error = a·N^(−b) + c" in report and "random-guess plateau" in report
    fits = {ln.split("|")[2].strip(): ln.split("|")[3].strip() for ln in report.splitlines()
            if ln.startswith("| psd | ")}  # metric -> form (or "–" where 3 tiny runs cannot be fitted)
    assert fits["zeroshot_shape_base.top1"] in ("plateau", "–") and fits["retrieval.t2i_R@1"] in ("power", "–")
    assert (out / "scaling_zeroshot_shape_base_top1.png").exists()
    again = cli("sweep", tmp_path / "sweep.yaml")
    assert again.stderr.count("done, skipped") == 3


def test_sweep_with_noise_levels_screening_and_val_test_splits(tmp_path, scheduler):
    """The study's shape: a regime check, PSD settings screened on the validation split, the chosen one scaled
    beside CLIP over two caption-noise levels, differences paired by seed, and a rerun that trains nothing."""
    recipe = {
        "name": "study", "out": str(tmp_path / "study"),
        "synthetic": {"n": 120, "heldout": 24, "seed": 1, "image_size": 32},
        "data": {"image_size": 32, "shard_size": 60, "thread_count": 8, "dask_scheduler": scheduler},
        "train": {"model": "rn-small", "batch_size": 16, "workers": 0, "warmup": 0.5},
        "sweep": {"subsets": ["0.5", "1.0"], "seeds": [0], "seeds_largest": [0, 1], "runner": "inprocess",
                  "prune": True,
                  "compute": {"rule": "epochs", "epochs": 0.3}, "split": True,
                  "noise": {"clean": {"mismatch_frac": 0.0, "shared_frac": 0.0},
                            "noisy": {"mismatch_frac": 0.5, "shared_frac": 0.2}},
                  "primary": "retrieval.mean_R@1", "metrics": ["zeroshot_shape_base.top1"],
                  "regime": {"method": "clip", "seed": 0, "require": {"zeroshot_shape_base.top1": 0.0}},
                  "methods": {"clip": {"loss": "clip"}},
                  "screen": {"subset": "0.5", "noise": "noisy", "seeds": [0],
                             "methods": {"psd-T2": {"loss": "psd", "teacher_temperature": 2.0, "alpha_start": 0.5},
                                         "psd-snap": {"loss": "psd", "snapshot_every": "epoch",
                                                      "alpha_start": 0.5}}}},
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(recipe))
    assert "2 noise level(s)" in cli("sweep", tmp_path / "study.yaml", "--check").stdout
    cli("sweep", tmp_path / "study.yaml")
    out = tmp_path / "study"
    screen = json.load(open(out / "screen.json"))
    assert screen["best"] in ("psd-T2", "psd-snap") and screen["metric"] == "val:retrieval.mean_R@1"
    table = pd.read_csv(out / "results.csv")
    assert set(table["noise"]) == {"clean", "noisy"} and set(table["method"]) == {"clip", screen["best"]}
    assert len(table) == 2 * 2 * (1 + 2)  # noise x methods x (seeds at 50pct + seeds at 100pct)
    assert {"retrieval.mean_R@1", "val:retrieval.mean_R@1"} <= set(table.columns)
    snap = out / "noisy" / "runs" / "50pct-psd-snap-s0"
    assert yaml.safe_load(open(snap / "train.yaml"))["snapshot_every"] == 4  # one pass over 60 pairs at batch 16
    run = out / "clean" / "runs" / "100pct-clip-s1"
    assert {f.name for f in (run / "eval").glob("*.json")} == {"synthetic-val.json", "synthetic-test.json"}
    assert not (run / "checkpoints").exists() and (run / "metrics.jsonl").exists()  # pruned once finished
    assert not (run / "plots").exists() and not (run / "eval" / "cache").exists()
    result = json.load(open(run / "eval" / "synthetic-test.json"))
    assert result["metrics"]["retrieval.gallery"] == 18 and "examples" not in result
    report = (out / "results.md").read_text()
    assert "Chosen for the scaling stage" in report and "### Noise level: clean" in report
    assert "detectable" in report and (out / "diff_retrieval_mean_R1.png").exists()
    assert (out / "scaling_noisy_retrieval_mean_R1.png").exists()
    changed = dict(recipe, train={**recipe["train"], "lr": 0.01})
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
    r = cli("sweep", tmp_path / "changed.yaml", check=False)  # finished runs are not reused for other settings
    assert r.returncode == 2 and "was trained with other settings (lr)" in r.stderr
    faster = dict(recipe, train={**recipe["train"], "threads": 1})  # speed only: finished runs are reused
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(faster))
    again = cli("sweep", tmp_path / "study.yaml")
    assert "steps" not in "".join(ln for ln in again.stderr.splitlines() if ln.startswith("[sweep]") and
                                   "done, skipped" not in ln and "regime" not in ln and "noise level" not in ln)
    screening = report[:report.index("Chosen for the scaling stage")]
    assert "Screening at 50pct" in screening and "| psd-T2 |" in screening and "| psd-snap |" in screening
    cli("sweep", tmp_path / "study.yaml", "--report")  # gathers only: the screening table is rebuilt, not lost
    reported = (out / "results.md").read_text()
    assert reported.startswith(screening) and f"**{screen['best']}**" in reported
    assert "Summary (noise level clean, the largest N" in reported and (out / "summary.md").exists()


def test_sweep_runners_sequential_torchrun_and_dask(tmp_path, scheduler):
    """The same one-run sweep launched as a `psdclip train` process, as a 2-process torchrun job, then as a task on
    a real Dask cluster (the shared one, which also builds the sweep's dataset)."""
    base = {
        "out": str(tmp_path / "sweep"),
        "synthetic": {"n": 120, "heldout": 20, "seed": 2, "image_size": 64},
        "data": {"image_size": 32, "shard_size": 60, "thread_count": 8, "dask_scheduler": scheduler},
        "train": {"model": "tiny", "batch_size": 16, "workers": 0, "warmup": 1},
    }
    sweep = {"subsets": ["1.0"], "seeds": [0], "compute": {"rule": "samples_seen", "samples": 32},
             "suites": ["synthetic"], "metrics": ["zeroshot_shape_base.top1"]}
    for runner, extra in (("sequential", {}), ("torchrun", {"nproc": 2}), ("dask", {"scheduler": scheduler})):
        recipe = {**base, "name": f"sweep-{runner}",
                  "sweep": {**sweep, "methods": {f"psd-{runner}": {"loss": "psd"}}, "runner": runner, **extra}}
        (tmp_path / f"{runner}.yaml").write_text(yaml.safe_dump(recipe))
        cli("sweep", tmp_path / f"{runner}.yaml")
        run = tmp_path / "sweep" / "runs" / f"100pct-psd-{runner}-s0"
        metrics = [json.loads(line) for line in open(run / "metrics.jsonl")]
        assert metrics[-1]["step"] == 2 and (run / "eval" / "synthetic.json").exists(), runner
        assert yaml.safe_load(open(run / "config.yaml"))["world_size"] == (2 if runner == "torchrun" else 1)
        table = pd.read_csv(tmp_path / "sweep" / "results.csv")
        assert list(table["method"]) == [f"psd-{runner}"]


def test_demo_end_to_end(tmp_path):
    r = cli("demo", "--out", tmp_path / "demo", "--n", 200, "--heldout", 30, "--steps", 3, "--batch-size", 32)
    out = tmp_path / "demo"
    assert "PSD - CLIP" in r.stdout and "example queries" in r.stdout
    for path in ("runs/clip/eval/synthetic.json", "runs/psd/eval/synthetic.json", "compare/compare.png",
                 "index/index.json", "dataset/subsets/1pct.json", "runs/psd/plots/loss.png"):
        assert (out / path).exists(), path
    success = (pd.read_parquet(out / "dataset" / "manifest")["status"] == "success").sum()
    assert 190 <= success <= 200  # duplicate images of the 200 are kept out
    assert json.load(open(out / "index" / "index.json"))["count"] == success


def test_cli_and_light_commands_import_no_model_stack():
    """`psdclip --help`, `data serve` and `data build`'s own process must not load torch, faiss or open_clip."""
    probe = ("import sys, psdclip.workflows.cli as c, psdclip.workflows.commands, psdclip.pipeline.serve, "
             "psdclip.pipeline.build, psdclip.pipeline.dataset; c.make_parser(); "
             "print(','.join(sorted(m for m in ('torch', 'faiss', 'open_clip') if m in sys.modules)))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "", (r.stdout, r.stderr[-2000:])
    # the parser alone (`psdclip --help`, a command's options) reads no data stack either: pandas alone is ~0.5 s
    probe = ("import sys, psdclip.workflows.cli as c; c.make_parser(); "
             "print(','.join(sorted(m for m in ('pandas', 'pyarrow', 'torch') if m in sys.modules)))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "", (r.stdout, r.stderr[-2000:])
    # and every command's function is where the table says
    import importlib

    from psdclip.workflows.cli import COMMANDS

    for cmd in COMMANDS:
        module, _, func = cmd.target.partition(":")
        assert callable(getattr(importlib.import_module(module), func)), cmd.target
        r = psdclip(*cmd.path, "--help")  # every command's help renders (argparse reads % in help texts)
        assert r.stdout.startswith("usage: psdclip " + " ".join(cmd.path)), r.stdout[:200]
