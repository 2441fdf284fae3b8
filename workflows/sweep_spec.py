"""The [sweep] section of a sweep recipe as a typed config (litgpt's style): one field per key, a docstring-like
help per field, checked in __post_init__ and loaded like every other recipe section (recipe.section ->
config.build_config, which refuses unknown keys and wrong types in one line)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from ..core.errors import InputError
from ..core.names import check_name
from ..core.options import option as _help


def steps_for(rule: dict, n_samples: int, batch_size: int) -> int:
    """The steps of one run under the declared compute rule."""
    if rule.get("rule") == "samples_seen":
        return max(1, int(rule["samples"]) // batch_size)
    if rule.get("rule") == "epochs":
        return max(1, math.ceil(float(rule["epochs"]) * n_samples / batch_size))
    raise InputError(f"[sweep] compute: rule must be samples_seen or epochs, got {rule.get('rule')!r}")


def is_size(entry: str) -> bool:
    """A subsets entry that is a fraction or count (else the name of a subset made beforehand)."""
    try:
        float(entry)
    except ValueError:
        return False
    return True


@dataclass
class SweepSpec:
    """A scaling-law sweep: dataset subsets x methods x seeds (x caption-noise levels) under a compute rule."""

    subsets: list[str] = _help("fractions or counts, written as nested subsets of the dataset, or names of subsets made "
                               "beforehand (DATASET/subsets/NAME.json, e.g. by `psdclip data subset`)",
                               default_factory=list)
    methods: dict = _help("method name -> train options (e.g. {clip: {loss: clip}})", default_factory=dict)
    seeds: list[int] = _help("seeds of every cell", default_factory=lambda: [0])
    seeds_largest: Optional[list[int]] = _help("seeds at the largest subset (default: seeds)", default=None)
    compute: dict = _help("{rule: epochs, epochs: E} or {rule: samples_seen, samples: S}",
                          default_factory=lambda: {"rule": "samples_seen", "samples": 10_000})
    noise: dict = _help("level name -> synthetic options: one source and dataset per caption-noise level",
                        default_factory=dict)
    split: bool = _help("evaluate the synthetic suite on its val and test splits", default=False)
    primary: str = _help("the metric declared before running (fits, differences, selection); default: the first of "
                         "metrics", default="")
    chance: dict = _help("metric -> random-guess value in [0, 1): fit its error with that plateau", default_factory=dict)
    screen: dict = _help("{subset, noise, seeds, methods}: screen PSD settings first on the validation split",
                         default_factory=dict)
    regime: Optional[dict] = _help("{method, seed, noise, require: {METRIC: MIN}}: stop if the baseline does not "
                                   "learn", default=None)
    runner: Literal["sequential", "inprocess", "torchrun", "dask"] = _help("how each run is started",
                                                                           default="sequential")
    nproc: int = _help("processes per run with runner: torchrun", default=2)
    scheduler: str = _help("the Dask scheduler address with runner: dask", default="")
    suites: list[str] = _help("evaluation suites of every run", default_factory=lambda: ["synthetic"])
    metrics: list[str] = _help("the metrics reported and fitted",
                               default_factory=lambda: ["zeroshot_shape_base.top1", "retrieval.t2i_R@1"])
    oracle_by: list[str] = _help("the synthetic scene attributes that make a ground-truth group for methods with "
                                 "oracle_targets: truth", default_factory=lambda: ["shape", "colour"])
    filters: dict = _help("filter name -> {top_fraction: F | min_score: S, exclude_near: EVAL}: a subset of every "
                          "pool size by the scorer's CLIP scores (workflows/filters.py)", default_factory=dict)
    scorer: dict = _help("{method, subset, seed} (a run of this sweep) or {checkpoint: PATH}: the model that scores "
                         "the samples for sweep.filters", default_factory=dict)
    robustness: dict = _help("{id: METRIC, ood: METRIC}: report each run's effective robustness against CLIP's trend "
                             "of the ood metric on the id one (a logit-space line over the clip runs)",
                             default_factory=dict)
    labels: dict = _help("method name -> what it is, in words, for the report's summary at the largest N "
                         "(summary.md): e.g. {clip-ls0.1: label smoothing 0.1 (control)}", default_factory=dict)
    prune: bool = _help("delete a finished run's checkpoints, feature cache, plots and per-example arrays",
                        default=False)

    def __post_init__(self):
        if not self.methods or not self.subsets:
            raise InputError("a sweep recipe needs sweep.methods and sweep.subsets")
        if not any(is_size(str(s)) for s in self.subsets):
            raise InputError("sweep.subsets needs at least one fraction or count (the pool sizes) beside subset names")
        for key, value in (("methods", self.methods), ("screen methods", self.screen.get("methods") or {})):
            for name, overrides in value.items():
                check_name(f"sweep {key[:-1]}", str(name))  # a run folder's name
                if overrides is not None and not isinstance(overrides, dict):
                    raise InputError(f"sweep {key[:-1]} {name!r} must be a mapping of train options")
        for level in self.noise:
            check_name("sweep noise level", str(level))  # a folder's name
        if not all(isinstance(v, dict) for v in self.noise.values()):
            raise InputError("sweep.noise must map a level name to a mapping of synthetic options")
        steps_for(self.compute, 1, 1)  # checks the rule
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1
                   for v in self.chance.values()):
            raise InputError("sweep.chance must map a metric to its random-guess value in [0, 1), e.g. "
                             "{zeroshot_shape_base.top1: 0.1667}")
        if self.seeds_largest is None:
            self.seeds_largest = list(self.seeds)
        self.primary = self.primary or self.metrics[0]
        if self.primary not in self.metrics:
            self.metrics.insert(0, self.primary)
        levels = list(self.noise) or [""]
        if self.screen:
            if not isinstance(self.screen.get("methods"), dict):
                raise InputError("sweep.screen needs methods (a mapping of name to settings)")
            if str(self.screen.get("subset")) not in self.subsets:
                raise InputError("sweep.screen.subset must be one of sweep.subsets")
            if self.screen.get("noise", levels[0]) not in levels:
                raise InputError("sweep.screen.noise must be one of sweep.noise's levels")
        if self.regime is not None and self.regime.get("noise", levels[0]) not in levels:
            raise InputError("sweep.regime must be a mapping whose noise (if any) is one of sweep.noise's levels")
        unknown = [k for k in self.labels if k not in self.methods and k not in (self.screen.get("methods") or {})]
        if unknown or not all(isinstance(v, str) for v in self.labels.values()):
            raise InputError(f"sweep.labels must map method names (of sweep.methods or its screen) to words"
                             f"{' (not methods: ' + ', '.join(map(str, unknown)) + ')' if unknown else ''}")
        if self.robustness and (set(self.robustness) != {"id", "ood"}
                                or not all(m in self.metrics for m in self.robustness.values())):
            raise InputError("sweep.robustness must be {id: METRIC, ood: METRIC}, both among sweep.metrics")
        from .filters import check_filters

        check_filters(self.filters, self.scorer, [s for s in map(str, self.subsets) if is_size(s)])
        if self.runner == "dask" and not self.scheduler:
            raise InputError("sweep.runner dask needs sweep.scheduler (tcp://HOST:PORT)")


@dataclass
class SweepConfig:
    """psdclip sweep: run a scaling-law sweep recipe, gather, fit and plot."""

    recipe: str = field(default="", metadata={"help": "sweep recipe YAML (a path or a bundled name)", "positional": True})
    out: str = field(default="", metadata={"help": "output folder (default: the recipe's out)"})
    check: bool = field(default=False, metadata={"help": "only parse and validate the recipe"})
    report: bool = field(default=False, metadata={"help": "write results.md, results.csv and the plots from the runs "
                                                          "finished so far, training nothing (a study spanning sessions)"})
    methods: str = field(default="", metadata={"help": "train only the runs of these methods of the recipe (comma-"
                                                       "separated); the others' finished runs are gathered as --report "
                                                       "does. One sweep split over processes, GPUs or machines that "
                                                       "share its folder, a method set each (the regime run, screen, "
                                                       "scorer and filters must be done first: a plain run of the "
                                                       "sweep makes them)"})

    def __post_init__(self):
        if not self.recipe:
            raise InputError("RECIPE is required")
