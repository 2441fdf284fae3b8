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
`snapshot_every: epoch` means one pass over its subset, and `oracle_targets: truth` the ground truth of the sweep's
source (`psdclip data oracle`, grouped by `oracle_by`) (a `warmup` below 1 is already a fraction of
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

import pandas as pd
import yaml

from ..core.io import read_json, write_json, write_text
from ..core.errors import InputError
from ..eval.config import result_name
from ..eval.metrics import ci_half, min_detectable

from .runs import RUNNERS, prune, suite_name, suite_spec
from .report import write_results
from .filters import make_filtered
from .sweep_spec import SweepConfig, SweepSpec, is_size, steps_for

log = logging.getLogger(__name__)


# ---- planning and running ----------------------------------------------------------------------------

def _validatable(settings: dict) -> dict:
    """Train settings with the sweep's own form (`snapshot_every: epoch`) replaced by a stand-in, so that TrainConfig can check everything else before the sweep starts."""
    out = dict(settings)
    if out.get("snapshot_every") == "epoch":
        out["snapshot_every"] = 1
    if out.get("oracle_targets") == "truth":
        out["oracle_targets"] = "truth.parquet"
    return out


class Sweep:
    """One sweep recipe, resolved: its noise levels (each a synthetic source and a dataset), methods, seeds."""

    def __init__(self, cfg: SweepConfig):
        from ..pipeline.subsets import parse_subsets
        from ..train.config import TrainConfig

        from .config import build_config
        from .recipe import load_recipe, section, validate

        self.path = cfg.recipe
        recipe = load_recipe(cfg.recipe)
        if not isinstance(recipe.get("sweep"), dict):
            raise InputError(f"{cfg.recipe}: a sweep recipe needs a [sweep] section (methods, subsets, ...)")
        try:
            self.spec = spec = section(recipe, "sweep", SweepSpec, cfg.recipe)
        except InputError as err:
            raise InputError(f"{cfg.recipe} [sweep]: {err}" if not str(err).startswith(cfg.recipe) else str(err)) \
                from None
        self.out = os.path.abspath(cfg.out or recipe.get("out") or os.path.join("sweeps", recipe.get("name", "sweep")))
        sizes = [str(x) for x in spec.subsets if is_size(str(x))]
        self.named = [str(x) for x in spec.subsets if not is_size(str(x))]  # subsets made beforehand, by name
        recipe.setdefault("data", {})["subsets"] = sizes
        if spec.noise and recipe.get("synthetic") is None:
            raise InputError(f"{cfg.recipe}: sweep.noise needs a [synthetic] section")
        self.noise, self.levels = spec.noise, list(spec.noise) or [""]
        self.cfgs = {}
        for level in self.levels:
            rec = copy.deepcopy(recipe)
            if rec.get("train") is not None:
                rec["train"] = _validatable(rec["train"])
            if level:
                rec["synthetic"] = {**(rec.get("synthetic") or {}), **self.noise[level]}
            self.cfgs[level] = validate(cfg.recipe, rec, os.path.join(self.out, level) if level else self.out)
        self.seeds, self.seeds_largest, self.rule = spec.seeds, spec.seeds_largest, spec.compute
        self.base_train = dict(recipe.get("train") or {})
        self.split, self.suites, self.metrics = spec.split, spec.suites, spec.metrics
        self.primary, self.chance, self.screen = spec.primary, spec.chance, spec.screen
        self.robustness = spec.robustness
        self.methods = {**spec.methods, **(self.screen.get("methods") or {})}
        for name, overrides in self.methods.items():
            settings = _validatable({**self.base_train, **(overrides or {})})
            build_config(TrainConfig, settings, {"data": "x", "out": "y"},
                         source=f"{cfg.recipe} [sweep.methods.{name}]")  # validate each method now
        self.subsets = [name for name, _ in parse_subsets(sizes)]  # "0.1" -> "10pct": the pool sizes
        if self.screen:
            (self.screen_subset, _), = parse_subsets([self.screen["subset"]])
        self.sources: dict[str, str | None] = {}

    def describe(self) -> str:
        subsets = len(self.spec.subsets) + len(self.subsets) * len(self.spec.filters)
        n = subsets * len(self.spec.methods) * len(self.levels)
        screen = f", screening {len(self.screen['methods'])} settings first" if self.screen else ""
        filters = f" ({len(self.spec.filters)} filter(s) in each size)" if self.spec.filters else ""
        return (f"valid sweep: {subsets} subsets{filters} x {len(self.spec.methods)} methods x "
                f"{len(self.seeds)} seeds x {len(self.levels)} noise level(s) ({n} cells){screen}")

    def prepare(self):
        from .recipe import prepare_dataset

        for level in self.levels:
            if level:
                log.info(f"[sweep] noise level {level}: source and dataset")
            self.sources[level] = prepare_dataset(self.cfgs[level])

    def subset_path(self, level: str, name: str) -> tuple[str, int]:
        path = os.path.join(self.cfgs[level]["data"].out, "subsets", f"{name}.json")
        if not os.path.isfile(path):
            raise InputError(f"sweep.subsets {name}: no such subset in {self.cfgs[level]['data'].out}/subsets (make it "
                             f"with `psdclip data subset`, or give a fraction or count)")
        with open(path) as f:
            return path, int(json.load(f)["count"])

    def oracle_file(self, level: str) -> str:
        """`oracle_targets: truth`: the ground-truth groups of the level's dataset (pipeline/truth.py), written once
        beside its runs."""
        from ..pipeline.truth import write_oracle

        root = os.path.join(self.out, level) if level else self.out
        path = os.path.join(root, "oracle.parquet")
        if not os.path.isfile(path):
            write_oracle(self.cfgs[level]["data"].out, self.sources[level], path, list(self.spec.oracle_by))
        return path

    def evals(self) -> list[tuple[str, str]]:
        """(suite spec template, split) of every evaluation a run gets."""
        out = []
        for suite in self.suites:
            splits = ("val", "test") if self.split and suite == "synthetic" else ("all",)
            out += [(suite, s) for s in splits]
        return out

    def run(self, level: str, subset: str, method: str, seed: int, keep: bool = False,
            gather: bool = False) -> dict | None:
        """Train and evaluate one run unless it is finished; returns its row of the results table. `keep`: not
        pruned yet (the scorer of sweep.filters, whose checkpoint scores the dataset first). `gather`: a run that
        has not finished is left as it is and None returned (`--report`)."""
        src = self.sources[level]
        subset_file, n = self.subset_path(level, subset)
        root = os.path.join(self.out, level) if level else self.out
        run = os.path.join(root, "runs", f"{subset}-{method}-s{seed}")
        settings = {**self.base_train, **(self.methods[method] or {})}
        batch = int(settings.get("batch_size", 128))
        steps = steps_for(self.rule, n, batch)
        if settings.get("snapshot_every") == "epoch":
            settings["snapshot_every"] = max(1, math.ceil(n / batch))
        if settings.get("oracle_targets") == "truth":
            settings["oracle_targets"] = self.oracle_file(level)
        files = {(s, sp): os.path.join(run, "eval", f"{result_name(suite_spec(s, src), sp)}.json")
                 for s, sp in self.evals()}
        tag = f"{level + ' ' if level else ''}{subset} (N={n}) {method} seed {seed}"
        wanted = {**settings, "data": subset_file, "out": run, "steps": steps, "seed": seed, "progress": False}
        self._same_settings(run, wanted)
        finished = all(os.path.isfile(f) for f in files.values())
        if gather and not finished:
            return None
        if finished:
            log.info(f"[sweep] {tag}: done, skipped")
        else:
            log.info(f"[sweep] {tag}: {steps} steps")
            self._train(wanted, run)
            for (suite, split), f in files.items():
                if not os.path.isfile(f):
                    self._eval(run, suite_spec(suite, src), split)
        if self.spec.prune and not keep:  # also a run finished before prune was set
            prune(run, list(files.values()))
        row = {"noise": level, "subset": subset, "N": n, "method": method, "seed": seed, "steps": steps}
        for (suite, split), f in files.items():
            with open(f) as fh:
                metrics = json.load(fh)["metrics"]
            prefix = ("val:" if split == "val" else "") + (f"{suite_name(suite)}." if suite_name(suite) else "")
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
        resolved = {}  # what the run was trained with: a setting the recipe now names at the value it had is the same
        if os.path.isfile(os.path.join(run, "config.yaml")):
            with open(os.path.join(run, "config.yaml"), encoding="utf-8") as f:
                resolved = yaml.safe_load(f) or {}
        # a study folder moved or cloned elsewhere: a path the run was given inside its old folder (the oracle's
        # file) is the same file at the same place in the new one
        old_root, new_root = (os.path.dirname(os.path.dirname(str(p))) for p in (before.get("out", run), run))

        def moved(value):
            if old_root != new_root and isinstance(value, str) and value.startswith(old_root + os.sep):
                return new_root + value[len(old_root):]
            return value

        changed = sorted(k for k in set(before) | set(wanted) if k not in ("data", "out", "threads")  # speed only
                         and moved(before.get(k, resolved.get(k))) != wanted.get(k))
        if changed:
            raise InputError(f"[sweep] {run} was trained with other settings ({', '.join(changed)}); delete it to "
                             f"train it again, or give the sweep another --out")

    def _train(self, config: dict, run: str):
        """Write RUN/train.yaml (the config `_same_settings` compares a rerun against) and train from it."""
        os.makedirs(run, exist_ok=True)
        train_yaml = os.path.join(run, "train.yaml")
        write_text(train_yaml, yaml.safe_dump(config, sort_keys=False))
        RUNNERS[self.spec.runner](self.spec, train_yaml, run)

    def _eval(self, run: str, spec: str, split: str):
        """In this process (the model is small next to a process start-up with torch)."""
        from ..eval.config import EvalConfig
        from ..eval.evaluate import evaluate

        evaluate(EvalConfig(target=run, suite=spec, split=split, workers=0))


def run_sweep(cfg: SweepConfig) -> int:
    sweep = Sweep(cfg)
    if cfg.check:
        print(f"{cfg.recipe}: {sweep.describe()}")
        return 0
    only = _only_methods(cfg, sweep)  # --methods: train these methods' runs, gather the others'
    sweep.prepare()
    os.makedirs(sweep.out, exist_ok=True)
    methods = dict(sweep.spec.methods)
    report = cfg.report  # gather the finished runs only: nothing is trained, scored or filtered
    if not report:
        check_regime(sweep, gather=bool(only))
    selection = None
    if sweep.screen:
        done = os.path.join(sweep.out, "screen.json")
        if only and not os.path.isfile(done):
            raise InputError(f"[sweep] --methods: the screen stage has not finished ({done}); run the sweep "
                             f"without --methods first")
        selection = screen(sweep) if not (report or only) else screen(sweep, gather=True) \
            if os.path.isfile(done) else None
        if selection:
            methods[selection["best"]] = sweep.methods[selection["best"]]
    rows, unfinished = [], []
    largest = sweep.subsets[-1]
    axis = bool(sweep.spec.filters or sweep.named)  # rows say their filter and pool

    def run(level, name, method, seed, extra):
        row = sweep.run(level, name, method, seed, gather=report or bool(only and method not in only))
        if row is None:
            unfinished.append(f"{level + ' ' if level else ''}{name}-{method}-s{seed}")
        else:
            rows.append({**row, **extra(row)} if axis else row)

    for i, level in enumerate(sweep.levels):
        filtered = make_filtered(sweep, level, gather=report or bool(only))
        if only and not report and len(filtered) < len(sweep.subsets) * len(sweep.spec.filters):
            raise InputError(f"[sweep] --methods: the scorer and filtered subsets of {level or 'the dataset'} are not "
                             f"all made yet; run the sweep without --methods first")
        for subset in sweep.subsets:
            cells = [(subset, "")] + [(name, f) for name, pool, f in filtered if pool == subset]
            pool_n = sweep.subset_path(level, subset)[1]
            for name, fname in cells:
                for method in methods:
                    for seed in (sweep.seeds_largest if subset == largest else sweep.seeds):
                        run(level, name, method, seed, lambda r: {"filter": fname, "pool": subset, "pool_N": pool_n})
        for name in sweep.named:
            for method in methods:
                for seed in sweep.seeds:
                    run(level, name, method, seed, lambda r: {"filter": name, "pool": "", "pool_N": r["N"]})
        if i < len(sweep.levels) - 1 and not report:  # a study spanning sessions reports each finished noise level
            write_results(sweep, rows, selection, pending=sweep.levels[i + 1:])
    if not rows:
        raise InputError(f"[sweep] --report: no run of {cfg.recipe} has finished yet in {sweep.out}")
    print(write_results(sweep, rows, selection, unfinished=unfinished))
    return 0


def _only_methods(cfg, sweep: Sweep) -> set[str]:
    """--methods as a set of the recipe's method names (empty: every method)."""
    only = {m.strip() for m in (cfg.methods or "").split(",") if m.strip()}
    known = set(sweep.methods) | set(sweep.spec.methods)
    unknown = sorted(only - known)
    if unknown:
        raise InputError(f"--methods {','.join(unknown)}: not a method of {cfg.recipe} (its methods: "
                         f"{', '.join(sorted(known))})")
    return only


def check_regime(sweep: Sweep, gather: bool = False) -> None:
    """`sweep.regime: {method: clip, seed: 0, require: {metric: minimum, ...}}`: before anything else, train that
    run at the largest subset (of `noise:`, else the first noise level) and stop with a one-line error if it misses a minimum on
    the validation split: a study in which the baseline does not learn cannot tell methods apart. `gather`
    (--methods): the run must have finished already; nothing is trained."""
    regime = sweep.spec.regime
    if not regime:
        return
    level, subset = regime.get("noise", sweep.levels[0]), sweep.subsets[-1]
    method, seed = regime.get("method", "clip"), int(regime.get("seed", sweep.seeds[0]))
    row = sweep.run(level, subset, method, seed, gather=gather)
    if row is None:
        raise InputError(f"[sweep] --methods: the regime run ({method} seed {seed} at {subset}"
                         f"{' ' + level if level else ''}) has not finished; run the sweep without --methods first")
    missed = []
    for metric, minimum in (regime.get("require") or {}).items():
        value = row.get(f"val:{metric}", row.get(metric))
        if value is None or value < float(minimum):
            missed.append(f"{metric} {value if value is None else round(value, 4)} < {minimum}")
    if missed:
        raise InputError(f"[sweep] the regime does not learn: at {subset} {level} the baseline has "
                         f"{'; '.join(missed)} (validation split); change model, budget or data before comparing")
    log.info(f"[sweep] regime check passed at {subset} {level}")


def screen(sweep: Sweep, gather: bool = False) -> dict:
    """Stage 1: CLIP and each screened PSD setting at one subset and noise level; the best PSD setting on the
    primary metric's validation split (never the test split) is chosen. Writes screen.csv and returns the
    choice and a markdown report. gather (`--report`, `--methods`, once screen.json is written): the same report
    from screen.csv, trains nothing, and keeps the choice screen.json recorded."""
    sc = sweep.screen
    level = sc.get("noise", sweep.levels[0])
    subset = sweep.screen_subset
    seeds = [int(s) for s in sc.get("seeds", sweep.seeds)]
    base = "clip" if "clip" in sweep.methods else next(iter(sweep.spec.methods))
    names = [base] + [m for m in sc["methods"] if m != base]
    done, table_path = os.path.join(sweep.out, "screen.json"), os.path.join(sweep.out, "screen.csv")
    if gather:
        recorded = read_json(done)
        if not os.path.isfile(table_path):
            return recorded
        table = pd.read_csv(table_path)
    else:
        table = pd.DataFrame([sweep.run(level, subset, m, s) for m in names for s in seeds])
        table.to_csv(table_path, index=False)
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
    best = max(psd, key=psd.get) if not gather else recorded["best"]
    lines += ["", f"Chosen for the scaling stage (best mean {key}): **{best}**"]
    if not gather:
        write_json(done, {"best": best, "metric": key, "scores": scores}, indent=1)
    return {"best": best, "report": "\n".join(lines)}


