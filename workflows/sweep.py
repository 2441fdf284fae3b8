"""psdclip sweep: a scaling-law sweep: dataset subsets x methods x seeds (x caption-noise levels) under a
declared compute rule, with an optional screening stage that picks the PSD setting on a validation split.

    sweep:
      subsets: [0.01, 0.1, 1.0]            # fractions or counts, written as nested subsets of the dataset
      methods: {clip: {loss: clip}, psd: {loss: psd, alpha_max: 0.5}}
      seeds: [0, 1, 2]
      seeds_largest: [0, 1, 2, 3, 4]       # optional: more seeds at the largest subset
      compute: {rule: epochs, epochs: 5}   # or {rule: samples_seen, samples: 9600}
      noise:                               # optional: one synthetic source (and dataset) per caption-noise level
        clean: {mismatch_frac: 0, shared_frac: 0, lowinfo_frac: 0}
        noisy: {mismatch_frac: 0.3, shared_frac: 0.1}
      split: true                          # evaluate the synthetic suite on its val and test splits
      primary: retrieval.mean_R@1          # the metric declared before running: fits, differences, selection
      chance: {zeroshot_shape_base.top1: 0.1667}   # optional: fit those metrics' errors with a random-guess plateau
      screen:                              # optional: screen PSD settings first, at one subset and noise level
        subset: "0.1"
        noise: noisy
        seeds: [0, 1, 2]
        methods: {psd-T2: {loss: psd, teacher_temperature: 2.0}, ...}
      runner: sequential                   # sequential | inprocess | torchrun (nproc: N) | dask (scheduler: tcp://...)
      suites: [synthetic]
      metrics: [zeroshot_shape_base.top1, retrieval.t2i_R@1, linear_probe_shape.accuracy]

`prune: true` deletes a finished run's checkpoints, feature cache, plots and per-example evaluation arrays (what a
study commits is small: configs, metrics.jsonl and each evaluation's metrics; sources and datasets are
regenerated from the seed by a rerun). A method's
`snapshot_every: epoch` means one pass over its subset (a `warmup` below 1 is already a fraction of
each run's steps). `regime: {method: clip, seed: 0, noise: LEVEL, require: {METRIC: MIN}}` first trains that run at the largest subset
(of that noise level, else the first) and
stops the sweep if it misses a minimum on the validation split (a baseline that does not learn cannot tell
methods apart). The screening stage runs CLIP and every
screened method, and the one with the best mean of the primary metric on the *validation* split joins the
scaling stage beside `methods`. Every run writes RUN/train.yaml and runs `psdclip train --config`; a run that
was cut off continues from its last checkpoint when the same command is run again, and finished runs (with
their evaluations) are skipped, so a sweep can span several working sessions.

Results (per noise level when there are several): results.csv (test split, or all scenes, with the
validation value of each metric as val:<metric>), results.md (mean ± 95% Student-t interval over seeds, fits
error = a·N^(−b) + c over the individual runs with their R² (or, for a metric with a declared chance value,
the same law with a random-guess plateau, fit_scaling), each method minus CLIP paired by seed with the
smallest difference the design detects), scaling_*.png and diff_*.png (method − CLIP against N).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import yaml

from psdclip.pipeline.dataset import read_json, write_json, write_text
from psdclip.pipeline.errors import InputError
from psdclip.train.config import result_name
from psdclip.train.metrics import ci_half, fit_scaling, min_detectable, predict

from .recipe import SweepConfig

log = logging.getLogger(__name__)


def _suite_spec(suite: str, src: str) -> str:
    """A sweep's suite entry as `psdclip eval --suite` takes it (plain `synthetic` means the sweep's source)."""
    return f"synthetic:{src}" if suite == "synthetic" else suite


def steps_for(rule: dict, n_samples: int, batch_size: int) -> int:
    if rule.get("rule") == "samples_seen":
        return max(1, int(rule["samples"]) // batch_size)
    if rule.get("rule") == "epochs":
        return max(1, math.ceil(float(rule["epochs"]) * n_samples / batch_size))
    raise InputError(f"[sweep] compute: rule must be samples_seen or epochs, got {rule.get('rule')!r}")


# ---- planning and running ----------------------------------------------------------------------------

def _validatable(settings: dict) -> dict:
    """Train settings with the sweep's own form (`snapshot_every: epoch`) replaced by a stand-in, so that TrainConfig can check everything else before the sweep starts."""
    out = dict(settings)
    if out.get("snapshot_every") == "epoch":
        out["snapshot_every"] = 1
    return out


class Sweep:
    """One sweep recipe, resolved: its noise levels (each a synthetic source and a dataset), methods, seeds."""

    def __init__(self, cfg: SweepConfig):
        from psdclip.train.config import TrainConfig

        from .config import build_config
        from .recipe import load_recipe, validate

        self.path = cfg.recipe
        recipe = load_recipe(cfg.recipe)
        sw = recipe.get("sweep") or {}
        if not isinstance(sw, dict) or not sw.get("methods") or not sw.get("subsets"):
            raise InputError(f"{cfg.recipe}: a sweep recipe needs sweep.methods and sweep.subsets")
        self.sw = sw
        self.out = os.path.abspath(cfg.out or recipe.get("out") or os.path.join("sweeps", recipe.get("name", "sweep")))
        recipe.setdefault("data", {})["subsets"] = [str(s) for s in sw["subsets"]]
        self.noise = sw.get("noise") or {}
        if not isinstance(self.noise, dict):
            raise InputError(f"{cfg.recipe}: sweep.noise must map a level name to synthetic options")
        if self.noise and recipe.get("synthetic") is None:
            raise InputError(f"{cfg.recipe}: sweep.noise needs a [synthetic] section")
        self.levels = list(self.noise) or [""]
        self.cfgs = {}
        for level in self.levels:
            rec = copy.deepcopy(recipe)
            if rec.get("train") is not None:
                rec["train"] = _validatable(rec["train"])
            if level:
                if not isinstance(self.noise[level], dict):
                    raise InputError(f"{cfg.recipe}: sweep.noise.{level} must be a mapping of synthetic options")
                rec["synthetic"] = {**(rec.get("synthetic") or {}), **self.noise[level]}
            self.cfgs[level] = validate(cfg.recipe, rec, os.path.join(self.out, level) if level else self.out)
        self.seeds = [int(s) for s in sw.get("seeds", [0])]
        self.seeds_largest = [int(s) for s in sw.get("seeds_largest", self.seeds)]
        self.rule = sw.get("compute", {"rule": "samples_seen", "samples": 10_000})
        if not isinstance(self.rule, dict):
            raise InputError(f"{cfg.recipe}: sweep.compute must be a mapping such as {{rule: epochs, epochs: 5}}")
        steps_for(self.rule, 1, 1)  # checks the rule
        self.base_train = dict(recipe.get("train") or {})
        self.split = bool(sw.get("split", False))
        self.suites = sw.get("suites", ["synthetic"])
        self.metrics = list(sw.get("metrics", ["zeroshot_shape_base.top1", "retrieval.t2i_R@1"]))
        self.primary = sw.get("primary") or self.metrics[0]
        self.chance = sw.get("chance") or {}
        if not isinstance(self.chance, dict) or not all(
                isinstance(v, (int, float)) and 0 <= v < 1 for v in self.chance.values()):
            raise InputError(f"{cfg.recipe}: sweep.chance must map a metric to its random-guess value in [0, 1), "
                             f"e.g. {{zeroshot_shape_base.top1: 0.1667}}")
        if self.primary not in self.metrics:
            self.metrics.insert(0, self.primary)
        self.screen = sw.get("screen") or {}
        if self.screen:
            if not isinstance(self.screen, dict) or not isinstance(self.screen.get("methods"), dict):
                raise InputError(f"{cfg.recipe}: sweep.screen needs methods (a mapping of name to settings)")
            if str(self.screen.get("subset")) not in self.cfgs[self.levels[0]]["data"].subsets:
                raise InputError(f"{cfg.recipe}: sweep.screen.subset must be one of sweep.subsets")
            if self.screen.get("noise", self.levels[0]) not in self.levels:
                raise InputError(f"{cfg.recipe}: sweep.screen.noise must be one of sweep.noise's levels")
        regime = sw.get("regime")
        if regime is not None and (not isinstance(regime, dict) or regime.get("noise", self.levels[0]) not in self.levels):
            raise InputError(f"{cfg.recipe}: sweep.regime must be a mapping whose noise (if any) is one of sweep.noise's "
                             f"levels")
        self.methods = {**sw["methods"], **(self.screen.get("methods") or {})}
        for name, overrides in self.methods.items():
            if overrides is not None and not isinstance(overrides, dict):
                raise InputError(f"{cfg.recipe}: sweep method {name!r} must be a mapping of train options")
            settings = _validatable({**self.base_train, **(overrides or {})})
            build_config(TrainConfig, settings, {"data": "x", "out": "y"},
                         source=f"{cfg.recipe} [sweep.methods.{name}]")  # validate each method now
        from psdclip.pipeline.subsets import parse_subsets

        self.subsets = [name for name, _ in parse_subsets(self.sw["subsets"])]  # "0.1" -> "10pct"
        if self.screen:
            (self.screen_subset, _), = parse_subsets([self.screen["subset"]])
        self.sources: dict[str, str | None] = {}

    def describe(self) -> str:
        n = len(self.sw["subsets"]) * len(self.sw["methods"]) * len(self.levels)
        screen = f", screening {len(self.screen['methods'])} settings first" if self.screen else ""
        return (f"valid sweep: {len(self.sw['subsets'])} subsets x {len(self.sw['methods'])} methods x "
                f"{len(self.seeds)} seeds x {len(self.levels)} noise level(s) ({n} cells){screen}")

    def prepare(self):
        from .recipe import prepare_dataset

        for level in self.levels:
            if level:
                log.info(f"[sweep] noise level {level}: source and dataset")
            self.sources[level] = prepare_dataset(self.cfgs[level])

    def subset_path(self, level: str, name: str) -> tuple[str, int]:
        path = os.path.join(self.cfgs[level]["data"].out, "subsets", f"{name}.json")
        with open(path) as f:
            return path, int(json.load(f)["count"])

    def evals(self) -> list[tuple[str, str]]:
        """(suite spec template, split) of every evaluation a run gets."""
        out = []
        for suite in self.suites:
            splits = ("val", "test") if self.split and suite == "synthetic" else ("all",)
            out += [(suite, s) for s in splits]
        return out

    def run(self, level: str, subset: str, method: str, seed: int) -> dict:
        """Train and evaluate one run unless it is finished; returns its row of the results table."""
        src = self.sources[level]
        subset_file, n = self.subset_path(level, subset)
        root = os.path.join(self.out, level) if level else self.out
        run = os.path.join(root, "runs", f"{subset}-{method}-s{seed}")
        settings = {**self.base_train, **(self.methods[method] or {})}
        batch = int(settings.get("batch_size", 128))
        steps = steps_for(self.rule, n, batch)
        if settings.get("snapshot_every") == "epoch":
            settings["snapshot_every"] = max(1, math.ceil(n / batch))
        files = {(s, sp): os.path.join(run, "eval", f"{result_name(_suite_spec(s, src), sp)}.json")
                 for s, sp in self.evals()}
        tag = f"{level + ' ' if level else ''}{subset} (N={n}) {method} seed {seed}"
        wanted = {**settings, "data": subset_file, "out": run, "steps": steps, "seed": seed, "progress": False}
        self._same_settings(run, wanted)
        if all(os.path.isfile(f) for f in files.values()):
            log.info(f"[sweep] {tag}: done, skipped")
        else:
            log.info(f"[sweep] {tag}: {steps} steps")
            self._train(wanted, run)
            for (suite, split), f in files.items():
                if not os.path.isfile(f):
                    self._eval(run, _suite_spec(suite, src), split)
        if self.sw.get("prune"):  # also a run finished before prune was set
            _prune(run, list(files.values()))
        row = {"noise": level, "subset": subset, "N": n, "method": method, "seed": seed, "steps": steps}
        for (suite, split), f in files.items():
            with open(f) as fh:
                metrics = json.load(fh)["metrics"]
            prefix = "val:" if split == "val" else ""
            row.update({prefix + k: v for k, v in metrics.items()})
        return row

    @staticmethod
    def _same_settings(run: str, wanted: dict) -> None:
        """A run folder is reused (skipped or resumed) only for the settings it was trained with."""
        path = os.path.join(run, "train.yaml")
        if not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as f:
            before = yaml.safe_load(f) or {}
        changed = sorted(k for k in set(before) | set(wanted) if k not in ("data", "out", "threads")  # speed only
                         and before.get(k) != wanted.get(k))
        if changed:
            raise InputError(f"[sweep] {run} was trained with other settings ({', '.join(changed)}); delete it to "
                             f"train it again, or give the sweep another --out")

    def _train(self, config: dict, run: str):
        """Write RUN/train.yaml (the config `_same_settings` compares a rerun against) and train from it."""
        os.makedirs(run, exist_ok=True)
        train_yaml = os.path.join(run, "train.yaml")
        write_text(train_yaml, yaml.safe_dump(config, sort_keys=False))
        args = ["train", "--config", train_yaml]
        runner = self.sw.get("runner", "sequential")
        exe = os.path.join(os.path.dirname(sys.executable), "psdclip")
        if runner == "torchrun":
            cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc-per-node",
                   str(self.sw.get("nproc", 2)), "-m", "psdclip.workflows.cli", *args]
        elif runner == "sequential":
            cmd = [exe, *args]
        elif runner == "inprocess":  # no process start-up per run (small runs, tests); a crash ends the sweep
            from psdclip.train.config import TrainConfig
            from psdclip.train.loop import train

            from .config import build_config, load_yaml

            train(build_config(TrainConfig, load_yaml(train_yaml), {}, source=train_yaml))
            return
        elif runner == "dask":
            from dask.distributed import Client

            with Client(self.sw["scheduler"]) as client:
                rc = client.submit(subprocess.call, [exe, *args], pure=False).result()
            if rc:
                raise InputError(f"[sweep] run {run} failed on the Dask cluster (exit {rc})")
            return
        else:
            raise InputError(f"[sweep] runner must be sequential, inprocess, torchrun or dask, got {runner!r}")
        rc = subprocess.call(cmd)
        if rc:
            raise InputError(f"[sweep] run {run} failed (exit {rc}); rerun the sweep to resume")

    def _eval(self, run: str, spec: str, split: str):
        """In this process (the model is small next to a process start-up with torch)."""
        from psdclip.train.config import EvalConfig
        from psdclip.train.evaluate import evaluate

        evaluate(EvalConfig(target=run, suite=spec, split=split, workers=0))


def run_sweep(cfg: SweepConfig) -> int:
    sweep = Sweep(cfg)
    if cfg.check:
        print(f"{cfg.recipe}: {sweep.describe()}")
        return 0
    sweep.prepare()
    os.makedirs(sweep.out, exist_ok=True)
    methods = dict(sweep.sw["methods"])
    check_regime(sweep)
    selection = None
    if sweep.screen:
        selection = screen(sweep)
        methods[selection["best"]] = sweep.methods[selection["best"]]
    rows = []
    largest = sweep.subsets[-1]
    for i, level in enumerate(sweep.levels):
        for subset in sweep.subsets:
            for method in methods:
                for seed in (sweep.seeds_largest if subset == largest else sweep.seeds):
                    rows.append(sweep.run(level, subset, method, seed))
        if i < len(sweep.levels) - 1:  # a study spanning sessions reports each finished noise level
            _write_results(sweep, rows, selection, pending=sweep.levels[i + 1:])
    print(_write_results(sweep, rows, selection))
    return 0


def _write_results(sweep: Sweep, rows: list[dict], selection: dict | None, pending=()) -> str:
    table = pd.DataFrame(rows)
    table.to_csv(os.path.join(sweep.out, "results.csv"), index=False)
    report = summarize(table, sweep.metrics, sweep.out, primary=sweep.primary, chance=sweep.chance)
    if selection:
        report = selection["report"] + "\n\n" + report
    if pending:
        report = (f"**Partial results**: noise level(s) {', '.join(pending)} not run yet; rerun the same command to "
                  f"go on.\n\n" + report)
    write_text(os.path.join(sweep.out, "results.md"), report + "\n")
    return report


def _prune(run: str, evals: list[str]) -> None:
    """A finished run keeps its configs, metrics.jsonl and the metrics of its evaluations: checkpoints, the
    feature cache, the per-example arrays of each evaluation (for `psdclip compare`'s bootstrap; the sweep pairs
    runs by seed) and the plots (`psdclip.train.plots.plot_run` redraws them from metrics.jsonl) go, so that a
    study of a hundred runs commits in a few MB."""
    import shutil

    for sub in ("checkpoints", os.path.join("eval", "cache"), "plots"):
        shutil.rmtree(os.path.join(run, sub), ignore_errors=True)
    for path in evals:
        result = read_json(path)
        if result.pop("examples", None) is not None:
            result["pruned"] = "per-example arrays removed by the sweep's prune: true"
            write_json(path, result, indent=1)


def check_regime(sweep: Sweep) -> None:
    """`sweep.regime: {method: clip, seed: 0, require: {metric: minimum, ...}}`: before anything else, train that
    run at the largest subset (of `noise:`, else the first noise level) and stop with a one-line error if it misses a minimum on
    the validation split: a study in which the baseline does not learn cannot tell methods apart."""
    regime = sweep.sw.get("regime")
    if not regime:
        return
    level, subset = regime.get("noise", sweep.levels[0]), sweep.subsets[-1]
    row = sweep.run(level, subset, regime.get("method", "clip"), int(regime.get("seed", sweep.seeds[0])))
    missed = []
    for metric, minimum in (regime.get("require") or {}).items():
        value = row.get(f"val:{metric}", row.get(metric))
        if value is None or value < float(minimum):
            missed.append(f"{metric} {value if value is None else round(value, 4)} < {minimum}")
    if missed:
        raise InputError(f"[sweep] the regime does not learn: at {subset} {level} the baseline has "
                         f"{'; '.join(missed)} (validation split); change model, budget or data before comparing")
    log.info(f"[sweep] regime check passed at {subset} {level}")


def screen(sweep: Sweep) -> dict:
    """Stage 1: CLIP and each screened PSD setting at one subset and noise level; the best PSD setting on the
    primary metric's validation split (never the test split) is chosen. Writes screen.csv and returns the
    choice and a markdown report."""
    sc = sweep.screen
    level = sc.get("noise", sweep.levels[0])
    subset = sweep.screen_subset
    seeds = [int(s) for s in sc.get("seeds", sweep.seeds)]
    base = "clip" if "clip" in sweep.methods else next(iter(sweep.sw["methods"]))
    names = [base] + [m for m in sc["methods"] if m != base]
    rows = [sweep.run(level, subset, m, s) for m in names for s in seeds]
    table = pd.DataFrame(rows)
    table.to_csv(os.path.join(sweep.out, "screen.csv"), index=False)
    key = f"val:{sweep.primary}" if f"val:{sweep.primary}" in table else sweep.primary
    lines = [f"Screening at {subset} (N={int(table['N'].iloc[0])}){' ' + level if level else ''}, seeds {seeds}: "
             f"{key}, each setting minus {base} paired by seed (mean ± 95% CI, smallest detectable difference at "
             f"80% power)", "", f"| method | {key} | Δ vs {base} | detectable |", "|---|---|---|---|"]
    b = table[table["method"] == base].set_index("seed")[key]
    scores = {}
    for m in names:
        v = table[table["method"] == m].set_index("seed")[key]
        d = (v - b).dropna().to_numpy(float)
        scores[m] = float(v.mean())
        lines.append(f"| {m} | {v.mean():.4f} ± {ci_half(v.to_numpy(float)):.4f} | "
                     + ("–" if m == base else f"{d.mean():+.4f} ± {ci_half(d):.4f}") + " | "
                     + ("–" if m == base else f"{min_detectable(d):.4f}") + " |")
    psd = {m: s for m, s in scores.items() if m != base}
    best = max(psd, key=psd.get)
    lines += ["", f"Chosen for the scaling stage (best mean {key}): **{best}**"]
    write_json(os.path.join(sweep.out, "screen.json"), {"best": best, "metric": key, "scores": scores}, indent=1)
    return {"best": best, "report": "\n".join(lines)}


# ---- summaries ---------------------------------------------------------------------------------------

def paired_differences(table: pd.DataFrame, metric: str, base: str = "clip") -> list[dict]:
    """(method − base) per N, paired by seed: mean, 95% Student-t half-width and smallest detectable difference."""
    out = []
    for n, grp in table.groupby("N"):
        if base not in set(grp["method"]) or metric not in grp:
            continue
        b = grp[grp["method"] == base].set_index("seed")[metric]
        for method in [m for m in grp["method"].unique() if m != base]:
            o = grp[grp["method"] == method].set_index("seed")[metric]
            seeds = sorted(set(b.index) & set(o.index))
            d = o.loc[seeds].to_numpy(float) - b.loc[seeds].to_numpy(float)
            out.append({"N": int(n), "method": method, "diff": float(d.mean()), "half": ci_half(d),
                        "detectable": min_detectable(d), "seeds": len(seeds)})
    return out


def summarize(table: pd.DataFrame, metrics: list[str], out: str, primary: str | None = None,
              chance: dict | None = None) -> str:
    """Per noise level: mean ± 95% CI (Student t) over seeds per (N, method), the scaling fits over the
    individual runs (fit_scaling: with a random-guess plateau for a metric whose chance value is declared), and
    each method minus CLIP on the primary metric; plots beside."""
    chance = chance or {}
    primary = primary or metrics[0]
    levels = [lv for lv in table["noise"].unique()] if "noise" in table else [""]
    sections, diffs = [], {}
    for level in levels:
        t = table[table["noise"] == level] if "noise" in table else table
        head = [f"### Noise level: {level}", ""] if level else []
        lines = head + ["| N | method | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
        fits = {}
        for (n, method), grp in t.groupby(["N", "method"]):
            cells = []
            for m in metrics:
                v = grp[m].dropna().to_numpy() if m in grp else np.array([])
                cells.append(f"{v.mean():.3f} ± {ci_half(v):.3f}" if len(v) else "")
            lines.append(f"| {n} | {method} | " + " | ".join(cells) + " |")
        lines += ["", "Fits of the error (1 − metric) over the individual runs: power law error = a·N^(−b) + c, or, "
                  "for a metric with a declared chance value, the power law with a random-guess plateau e0 = 1 − "
                  "chance: error = c + (e0 − c)/(1 + (N/N0)^b) (≈ a·N^(−b) + c for N ≫ N0). R² (power law) is the "
                  "plain power law's fit over the same points; R² ceiling the most any curve in N can reach over "
                  "them (the share of their variance the per-N means explain: the rest is the spread between "
                  "seeds).", "",
                  "| method | metric | form | a | b | c | N0 | R² | R² (power law) | R² ceiling |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for method, grp in t.groupby("method"):
            for m in metrics:
                if m not in grp:
                    continue
                g = grp[["N", m]].dropna()
                guess = 1 - float(chance[m]) if m in chance else None
                fit = fit_scaling(g["N"].to_numpy(), 1 - g[m].to_numpy(), guess)
                fits[(method, m)] = fit
                if fit["ok"]:
                    n0 = f"{fit['n0']:.0f}" if "n0" in fit else "–"
                    lines.append(f"| {method} | {m} | {fit['form']} | {fit['a']:.3g} | {fit['b']:.3f} | "
                                 f"{fit['c']:.3f} | {n0} | {fit['r2']:.3f} | {fit.get('r2_power', fit['r2']):.3f} | "
                                 f"{fit['r2_max']:.3f} |")
                else:
                    lines.append(f"| {method} | {m} | – | – | – | – | – | {fit['note']} | – | – |")
        d = paired_differences(t, primary)
        diffs[level] = d
        if d:
            lines += ["", f"Each method minus clip on {primary}, paired by seed (mean ± 95% Student-t interval; "
                      "detectable: the smallest true difference this many seeds detect at 80% power):", "",
                      "| N | method | Δ | detectable | seeds |", "|---|---|---|---|---|"]
            lines += [f"| {r['N']} | {r['method']} | {r['diff']:+.4f} ± {r['half']:.4f} | {r['detectable']:.4f} | "
                      f"{r['seeds']} |" for r in d]
        _plot_fits(t, metrics, fits, out, level)
        sections.append("\n".join(lines))
    if any(diffs.values()):
        _plot_diffs(diffs, primary, out)
    return "\n\n".join(sections)


def _slug(text: str) -> str:
    return text.replace(".", "_").replace("@", "").replace(":", "_")


def _plot_fits(table, metrics, fits, out, level=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for m in metrics:
        if m not in table:
            continue
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for method, grp in table.groupby("method"):
            pts = ax.scatter(grp["N"], 1 - grp[m], s=14, alpha=0.6, label=f"{method} runs")
            fit = fits.get((method, m), {"ok": False})
            if fit["ok"]:
                xs = np.logspace(np.log10(grp["N"].min()), np.log10(grp["N"].max()), 50)
                label = (f"{method}: plateau, N0 {fit['n0']:.0f}, b {fit['b']:.2f}, c {fit['c']:.2f}"
                         if fit["form"] == "plateau" else f"{method}: {fit['a']:.2f}·N^-{fit['b']:.2f}+{fit['c']:.2f}")
                ax.plot(xs, predict(fit, xs), color=pts.get_facecolor()[0][:3], label=f"{label} (R² {fit['r2']:.2f})")
        ax.set_xscale("log")
        ax.set_xlabel("training pairs N")
        ax.set_ylabel(f"error (1 − {m})")
        ax.set_title(f"noise: {level}" if level else m, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"scaling_{level + '_' if level else ''}{_slug(m)}.png"))
        plt.close(fig)


def _plot_diffs(diffs: dict, metric: str, out: str):
    """method − CLIP against N with 95% intervals, one panel per noise level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [lv for lv in diffs if diffs[lv]]
    fig, axes = plt.subplots(1, len(levels), figsize=(5 * len(levels), 4), dpi=100, squeeze=False, sharey=True)
    for ax, level in zip(axes[0], levels):
        d = pd.DataFrame(diffs[level])
        methods = list(d["method"].unique())
        for i, (method, grp) in enumerate(d.groupby("method", sort=False)):
            shift = 1 + 0.06 * (i - (len(methods) - 1) / 2)  # side by side on the log axis
            ax.errorbar(grp["N"] * shift, grp["diff"], yerr=grp["half"].fillna(0), fmt="o-", capsize=3,
                        label=method)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("training pairs N")
        ax.set_title(f"noise: {level}" if level else "", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"Δ {metric} vs CLIP (95% CI)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"diff_{_slug(metric)}.png"))
    plt.close(fig)
