"""The filter axis of a sweep (DataComp's question: does choosing the rows move the curve more than the method?).

    sweep:
      subsets: ["0.5", "1.0"]              # the pool sizes (nested subsets, as without filters)
      scorer: {method: clip, subset: "1.0", seed: 0}    # a run of this sweep; or {checkpoint: PATH}
      filters:                             # each applied inside every pool size
        top50: {top_fraction: 0.5}
        top30: {top_fraction: 0.3}
        clean: {min_score: 0.2, exclude_near: PATH}

The scorer is trained first (a run of the sweep like any other, its checkpoint kept until it has scored), then
`psdclip data score` scores every successful sample of the dataset with it (DATASET/scores/scorer-.../), then
`psdclip data subset --within POOL` writes one subset per pool and filter, named POOL-FILTER (`50pct-top30`), and
every method and seed trains on each: the unfiltered pools, and the filtered ones, whose N is what they kept. A
subset file that exists is reused only when rebuilding it gives the same document (same scores, rule and pool),
else the sweep stops with one line: runs already trained on it would be mixed with runs on another selection.

Entries of `subsets` that are not numbers name subsets the user made beforehand (`psdclip data subset`), trained
as they are. The report (report.py) shows filtered runs as `METHOD [FILTER]`, and each filter minus no filter at
the same pool, paired by seed, with its plot (diff_filter_*.png).
"""
from __future__ import annotations

import json
import logging
import os

from ..core.errors import InputError
from ..core.io import read_json, write_json

log = logging.getLogger(__name__)

RULE_KEYS = {"top_fraction", "min_score", "exclude_near", "max_hamming"}


def check_filters(filters: dict, scorer: dict, sizes: list[str]) -> None:
    """Refuse, in one line, a filter that names no rule, an unknown key, or a score rule without a scorer."""
    for name, rule in filters.items():
        if not isinstance(rule, dict) or not rule:
            raise InputError(f"sweep.filters.{name}: expected a mapping such as {{top_fraction: 0.3}}")
        unknown = sorted(set(rule) - RULE_KEYS)
        if unknown:
            raise InputError(f"sweep.filters.{name}: unknown key(s) {', '.join(unknown)}; expected "
                             f"{', '.join(sorted(RULE_KEYS))}")
        if "top_fraction" in rule and "min_score" in rule:
            raise InputError(f"sweep.filters.{name}: give one of top_fraction and min_score, not both")
        if "top_fraction" not in rule and "min_score" not in rule and not rule.get("exclude_near"):
            raise InputError(f"sweep.filters.{name}: give one of top_fraction and min_score (or exclude_near)")
        if "top_fraction" in rule and not 0 < float(rule["top_fraction"]) <= 1:
            raise InputError(f"sweep.filters.{name}: top_fraction must be in (0, 1]")
        if not name.replace("-", "").replace("_", "").isalnum():
            raise InputError(f"sweep.filters: the name {name!r} must be letters, digits, - or _")
        if ("top_fraction" in rule or "min_score" in rule) and not scorer:
            raise InputError(f"sweep.filters.{name}: a score rule needs sweep.scorer ({{method, subset, seed}} or "
                             f"{{checkpoint: PATH}})")
    if scorer:
        if bool(scorer.get("checkpoint")) == bool(scorer.get("method")):
            raise InputError("sweep.scorer: give either {method, subset, seed} (a run of this sweep) or "
                             "{checkpoint: PATH}")
        if scorer.get("method") and str(scorer.get("subset", sizes[-1] if sizes else "")) not in sizes:
            raise InputError("sweep.scorer.subset must be one of sweep.subsets' sizes")


def scored_by(sweep, level: str) -> str:
    """Score the level's dataset with the scorer (once; later sweeps find the scores) and return their name."""
    from ..index.score import score
    from ..pipeline.config import ScoreConfig
    from ..pipeline.subsets import parse_subsets
    from .runs import prune

    scorer = sweep.spec.scorer
    dataset = sweep.cfgs[level]["data"].out
    marker_dir = os.path.join(sweep.out, level) if level else sweep.out
    marker = os.path.join(marker_dir, "scorer.json")
    if scorer.get("checkpoint"):
        checkpoint, run, name = os.path.abspath(scorer["checkpoint"]), None, "scorer-checkpoint"
    else:
        (subset, _), = parse_subsets([str(scorer.get("subset", sweep.spec.subsets[-1]))])
        method, seed = scorer["method"], int(scorer.get("seed", sweep.seeds[0]))
        if method not in sweep.methods:
            raise InputError(f"sweep.scorer.method {method!r} is not one of sweep.methods")
        name = f"scorer-{subset}-{method}-s{seed}"
        run = os.path.join(marker_dir, "runs", f"{subset}-{method}-s{seed}")
        checkpoint = run
    wanted = {"scores": name, "checkpoint": checkpoint, "dataset": os.path.abspath(dataset)}
    done = read_json(marker) if os.path.isfile(marker) else None
    if done is not None:
        if {k: done.get(k) for k in wanted} != wanted:
            raise InputError(f"{marker}: the scores were made by another scorer ({done.get('scores')}); delete it "
                             f"and the dataset's scores/ to score again")
        return name
    if run is not None:
        sweep.run(level, subset, method, seed, keep=True)
    log.info(f"[sweep] scoring {dataset} with {checkpoint}")
    score(ScoreConfig(dataset=dataset, checkpoint=checkpoint, name=name, progress=False,
                          workers=int(sweep.base_train.get("workers", 1))))
    os.makedirs(marker_dir, exist_ok=True)
    write_json(marker, {**read_json(os.path.join(dataset, "scores", name, "score.json")), **wanted}, indent=1)
    if run is not None and sweep.spec.prune:
        prune(run, [])
    return name


def make_filtered(sweep, level: str, gather: bool = False) -> list[tuple[str, str, str]]:
    """Write every (pool, filter) subset of the level's dataset; returns [(subset name, pool, filter)]. `gather`
    (`sweep --report`): score and write nothing, return the subsets already written."""
    from ..pipeline.format import SCORE_COLUMN, DatasetLayout
    from ..pipeline.curate import score_subset

    filters = sweep.spec.filters
    if not filters:
        return []
    dataset = sweep.cfgs[level]["data"].out
    root = DatasetLayout(dataset).root
    if gather:
        return [(f"{pool}-{f}", pool, f) for pool in sweep.subsets for f in filters
                if os.path.isfile(os.path.join(root, "subsets", f"{pool}-{f}.json"))]
    scores = scored_by(sweep, level) if sweep.spec.scorer else None
    out = []
    for pool in sweep.subsets:
        for fname, rule in filters.items():
            name = f"{pool}-{fname}"
            has_score = "top_fraction" in rule or "min_score" in rule
            doc = score_subset(dataset, name, scores if has_score else None, SCORE_COLUMN, rule.get("min_score"),
                               rule.get("top_fraction"), pool, rule.get("exclude_near"),
                               int(rule.get("max_hamming", 8)))
            doc = json.loads(json.dumps(doc))
            path = os.path.join(root, "subsets", f"{name}.json")
            if os.path.isfile(path):
                if read_json(path) != doc:
                    raise InputError(f"{path}: this subset was made from other scores, rule or pool than sweep.filters."
                                     f"{fname} now gives; delete it and the runs trained on it to filter again")
            else:
                write_json(path, doc, indent=1)
                log.info(f"[sweep] subset {name}: {doc['count']:,} of {doc['of_total']:,} samples")
            out.append((name, pool, fname))
    return out
