"""psdclip sweep: a scaling-law sweep: dataset subsets x methods x seeds under a declared compute rule.

    sweep:
      subsets: [0.01, 0.1, 1.0]            # fractions or counts, written as nested subsets of the dataset
      methods: {clip: {loss: clip}, psd: {loss: psd, alpha_max: 0.5}}
      seeds: [0, 1]
      compute: {rule: samples_seen, samples: 9600}    # or {rule: epochs, epochs: 5}
      runner: sequential                    # sequential | torchrun (nproc: N) | dask (scheduler: tcp://...)
      suites: [synthetic]
      metrics: [zeroshot_shape_base.top1, retrieval.t2i_R@1, linear_probe_shape.accuracy]

Finished runs (with an evaluation) are skipped, so a sweep resumes. Results: results.csv, results.md, and
for every method and metric a fit error = a·N^(−b) + c with its R², drawn in scaling_<metric>.png.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from psdclip.pipeline.errors import InputError
from psdclip.train.evaluate import result_name


def _suite_spec(suite: str, src: str) -> str:
    """A sweep's suite entry as `psdclip eval --suite` takes it (plain `synthetic` means the sweep's source)."""
    return f"synthetic:{src}" if suite == "synthetic" else suite


@dataclass
class SweepConfig:
    """psdclip sweep: run a scaling-law sweep recipe, gather, fit and plot."""

    recipe: str = field(default="", metadata={"help": "sweep recipe YAML (a path or a bundled name)", "positional": True})
    out: str = field(default="", metadata={"help": "output folder (default: the recipe's out)"})
    check: bool = field(default=False, metadata={"help": "only parse and validate the recipe"})

    def __post_init__(self):
        if not self.recipe:
            raise InputError("RECIPE is required")


def steps_for(rule: dict, n_samples: int, batch_size: int) -> int:
    if rule.get("rule") == "samples_seen":
        return max(1, int(rule["samples"]) // batch_size)
    if rule.get("rule") == "epochs":
        return max(1, math.ceil(float(rule["epochs"]) * n_samples / batch_size))
    raise InputError(f"[sweep] compute: rule must be samples_seen or epochs, got {rule.get('rule')!r}")


def power_law(n, a, b, c):
    return a * np.power(n, -b) + c


def fit_power_law(ns, errors) -> dict:
    """error = a·N^(−b) + c by least squares; R² of the fit."""
    from scipy.optimize import curve_fit

    ns, errors = np.asarray(ns, float), np.asarray(errors, float)
    if len(np.unique(ns)) < 3:
        return {"ok": False, "note": "needs at least three data sizes"}
    try:
        (a, b, c), _ = curve_fit(power_law, ns, errors, p0=(1.0, 0.3, float(errors.min()) * 0.5),
                                 bounds=([0, 0, 0], [np.inf, 3, 1]), maxfev=20000)
    except (RuntimeError, ValueError) as err:
        return {"ok": False, "note": str(err)}
    pred = power_law(ns, a, b, c)
    ss_res, ss_tot = float(((errors - pred) ** 2).sum()), float(((errors - errors.mean()) ** 2).sum())
    return {"ok": True, "a": float(a), "b": float(b), "c": float(c), "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


def run_sweep(cfg: SweepConfig) -> int:
    from psdclip.train.config import TrainConfig

    from .config import build_config
    from .recipe import load_recipe, prepare_dataset, validate

    recipe = load_recipe(cfg.recipe)
    sw = recipe.get("sweep") or {}
    if not sw.get("methods") or not sw.get("subsets"):
        raise InputError(f"{cfg.recipe}: a sweep recipe needs sweep.methods and sweep.subsets")
    out = os.path.abspath(cfg.out or recipe.get("out") or os.path.join("sweeps", recipe.get("name", "sweep")))
    recipe.setdefault("data", {})["subsets"] = [str(s) for s in sw["subsets"]]
    cfgs = validate(cfg.recipe, recipe, out)
    seeds = sw.get("seeds", [0])
    rule = sw.get("compute", {"rule": "samples_seen", "samples": 10_000})
    base_train = dict(recipe.get("train") or {})
    plan = []
    for name, overrides in sw["methods"].items():
        build_config(TrainConfig, {**base_train, **(overrides or {})}, {"data": "x", "out": "y"},
                     source=f"{cfg.recipe} [sweep.methods.{name}]")  # validate each method now
        plan.append(name)
    if cfg.check:
        print(f"{cfg.recipe}: valid sweep: {len(sw['subsets'])} subsets x {len(plan)} methods x {len(seeds)} seeds")
        return 0
    src = prepare_dataset(cfgs)
    ds = cfgs["data"].out
    from psdclip.pipeline.subsets import parse_subsets

    rows = []
    for subset_name, _ in parse_subsets(cfgs["data"].subsets):
        subset = os.path.join(ds, "subsets", f"{subset_name}.json")
        n = json.load(open(subset))["count"]
        for method in plan:
            for seed in seeds:
                run = os.path.join(out, "runs", f"{subset_name}-{method}-s{seed}")
                settings = {**base_train, **(sw["methods"][method] or {})}
                batch = int(settings.get("batch_size", 128))
                steps = steps_for(rule, n, batch)
                done = all(os.path.isfile(os.path.join(run, "eval", f"{result_name(_suite_spec(s, src))}.json"))
                           for s in sw.get("suites", ["synthetic"]))
                if not done:
                    print(f"[sweep] {subset_name} (N={n}) {method} seed {seed}: {steps} steps", file=sys.stderr, flush=True)
                    _train_and_eval(sw, settings, subset, run, steps, seed, src)
                else:
                    print(f"[sweep] {subset_name} {method} seed {seed}: done, skipped", file=sys.stderr)
                metrics = {}
                for f in os.listdir(os.path.join(run, "eval")):
                    if f.endswith(".json"):
                        metrics.update(json.load(open(os.path.join(run, "eval", f)))["metrics"])
                rows.append({"subset": subset_name, "N": n, "method": method, "seed": seed, "steps": steps, **metrics})
    table = pd.DataFrame(rows)
    table.to_csv(os.path.join(out, "results.csv"), index=False)
    metric_names = sw.get("metrics", ["zeroshot_shape_base.top1", "retrieval.t2i_R@1", "linear_probe_shape.accuracy"])
    report = summarize(table, metric_names, out)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(report + "\n")
    print(report)
    return 0


def ci_half(values: np.ndarray) -> float:
    """Half-width of the 95% confidence interval of the mean, Student t (few seeds: t, not 1.96)."""
    from scipy.stats import t

    n = len(values)
    return float(t.ppf(0.975, n - 1) * values.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")


def summarize(table: pd.DataFrame, metrics: list[str], out: str) -> str:
    """Mean ± 95% CI (Student t) over seeds per (N, method), and the power-law fits."""
    lines = ["| N | method | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    fits = {}
    for (n, method), grp in table.groupby(["N", "method"]):
        cells = []
        for m in metrics:
            v = grp[m].dropna().to_numpy() if m in grp else np.array([])
            cells.append(f"{v.mean():.3f} ± {ci_half(v):.3f}" if len(v) else "")
        lines.append(f"| {n} | {method} | " + " | ".join(cells) + " |")
    lines += ["", "Power-law fits of the error (1 − metric): error = a·N^(−b) + c", "",
              "| method | metric | a | b | c | R² |", "|---|---|---|---|---|---|"]
    for method, grp in table.groupby("method"):
        for m in metrics:
            if m not in grp:
                continue
            means = grp.groupby("N")[m].mean()
            fit = fit_power_law(means.index.to_numpy(), 1 - means.to_numpy())
            fits[(method, m)] = (means, fit)
            if fit["ok"]:
                lines.append(f"| {method} | {m} | {fit['a']:.3f} | {fit['b']:.3f} | {fit['c']:.3f} | {fit['r2']:.3f} |")
            else:
                lines.append(f"| {method} | {m} | – | – | – | {fit['note']} |")
    _plot(table, metrics, fits, out)
    return "\n".join(lines)


def _plot(table, metrics, fits, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for m in metrics:
        if m not in table:
            continue
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for method, grp in table.groupby("method"):
            ax.scatter(grp["N"], 1 - grp[m], s=14, alpha=0.6, label=f"{method} runs")
            means, fit = fits.get((method, m), (None, {"ok": False}))
            if fit["ok"]:
                xs = np.logspace(np.log10(grp["N"].min()), np.log10(grp["N"].max()), 50)
                ax.plot(xs, power_law(xs, fit["a"], fit["b"], fit["c"]),
                        label=f"{method}: {fit['a']:.2f}·N^-{fit['b']:.2f}+{fit['c']:.2f}")
        ax.set_xscale("log")
        ax.set_xlabel("training samples N")
        ax.set_ylabel(f"error (1 − {m})")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"scaling_{m.replace('.', '_').replace('@', '')}.png"))
        plt.close(fig)


def _train_and_eval(sw: dict, settings: dict, subset: str, run: str, steps: int, seed: int, src: str | None):
    args = ["train", "--data", subset, "--out", run, "--steps", str(steps), "--seed", str(seed), "--no-progress"]
    for k, v in settings.items():
        if k in ("steps", "seed", "data", "out"):
            continue
        flag = "--" + k.replace("_", "-")
        args += [flag] if v is True else [f"--no-{k.replace('_', '-')}"] if v is False else [flag, str(v)]
    runner = sw.get("runner", "sequential")
    exe = os.path.join(os.path.dirname(sys.executable), "psdclip")
    if runner == "torchrun":
        cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc-per-node",
               str(sw.get("nproc", 2)), "-m", "psdclip.workflows.cli", *args]
    elif runner == "sequential":
        cmd = [exe, *args]
    elif runner == "dask":
        from dask.distributed import Client

        with Client(sw["scheduler"]) as client:
            rc = client.submit(subprocess.call, [exe, *args], pure=False).result()
        if rc:
            raise InputError(f"[sweep] run {run} failed on the Dask cluster (exit {rc})")
        cmd = None
    else:
        raise InputError(f"[sweep] runner must be sequential, torchrun or dask, got {runner!r}")
    if cmd is not None:
        rc = subprocess.call(cmd)
        if rc:
            raise InputError(f"[sweep] run {run} failed (exit {rc}); rerun the sweep to resume")
    for suite in sw.get("suites", ["synthetic"]):
        spec = _suite_spec(suite, src)
        if subprocess.call([exe, "eval", run, "--suite", spec], stdout=subprocess.DEVNULL):
            raise InputError(f"[sweep] evaluation of {run} on {spec} failed")
