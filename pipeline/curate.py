"""`psdclip data subset` by score or by decontamination: the subset document of a threshold on a score column
(scores.py: --min-score, --max-score, --top-fraction of a histogram, never a global sort) and/or of the samples whose
image copies an evaluation image (decontam.py: --exclude-near), inside the dataset or a nested subset (--within).
The client holds the histogram and one shard's keys at a time."""
from __future__ import annotations

import os

import numpy as np

from ..core.errors import InputError
from ..core.io import read_json

from .decontam import Decontaminator
from .format import DatasetLayout, dataset_id, read_info, shard_format, shard_name
from .reader import success_keys
from .scores import BINS, check_made_for, read_scores, threshold_for
from .subsets import SubsetRule


def score_subset(dataset: str, name: str, scores: str | None, column: str, min_score: float | None,
                 top_fraction: float | None, within: str | None, exclude_near: str | None = None,
                 max_hamming: int = 8, max_score: float | None = None) -> dict:
    """The subset document of a score threshold and/or a decontamination (see the module docstring and
    decontam.py): the base rule (the dataset, or --within's subset), the threshold on top, the copies of
    evaluation images left out."""
    info = read_info(dataset)
    if scores:
        check_made_for(dataset, scores)
    root = DatasetLayout(dataset).root
    if within:
        path = os.path.join(root, "subsets", f"{within}.json")
        if not os.path.isfile(path):
            raise InputError(f"--within {within}: no such subset in {dataset}/subsets")
        base_doc = read_json(path)
        if base_doc.get("score") or base_doc.get("exclude"):
            raise InputError(f"--within {within}: a filtered subset; filter inside a size subset (or the dataset)")
        base = SubsetRule.of(base_doc)
    else:
        base = SubsetRule(whole=frozenset(shard_name(s, shard_format(info)) for s in info.get("shards", [])))
    shards = [(s, int(s.split(".")[0])) for s in base.shards()]

    def members(shard_file, n):  # (keys, scores) the base rule takes; scores None without --score
        if not scores:
            keys = success_keys(dataset, n)
            return keys[base.keeps(shard_file, keys)], None
        keys, values = read_scores(dataset, scores, n, column)
        mask = base.keeps(shard_file, keys)
        return keys[mask], values[mask]

    minimum, maximum = -np.inf, np.inf  # kept: minimum <= score <= maximum
    if scores and max_score is not None:  # e.g. nn_similarity: a dedupe keeps the samples with no close copy
        maximum = float(max_score)
    elif scores and top_fraction is not None:
        hist = np.zeros(BINS, np.int64)
        for shard_file, n in shards:
            hist += np.histogram(np.clip(members(shard_file, n)[1], -1, 1), bins=BINS, range=(-1.0, 1.0))[0]
        minimum = threshold_for(hist, top_fraction)
    elif scores:
        minimum = float(min_score)
    counts, lo, hi, of_total = {}, np.inf, -np.inf, 0
    cleaner = exclude = None
    if exclude_near:
        cleaner = Decontaminator(dataset, exclude_near, max_hamming)
        exclude = {"eval": os.path.abspath(exclude_near), "max_hamming": max_hamming, "exact": 0, "near": 0,
                   "keys": []}
    for shard_file, n in shards:  # one shard's keys at a time
        keys, values = members(shard_file, n)
        of_total += len(keys)
        if values is not None:
            inside = (values >= minimum) & (values <= maximum)
            keys, values = keys[inside], values[inside]
            if len(values):
                lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
        kept = len(keys)
        if cleaner is not None and kept:
            exact, near = cleaner.shard(n, set(keys.tolist()))
            exclude["exact"] += len(exact)
            exclude["near"] += len(near)
            exclude["keys"] += sorted(exact | near)
            kept -= len(exact | near)
        if kept:
            counts[shard_file] = kept
    count = sum(counts.values())
    if not count:
        raise InputError(f"--name {name}: no sample is left; the subset would be empty")
    doc = {"name": name, "count": count, "of_total": of_total, "dataset_id": dataset_id(info),
           "seed": base.seed, "shards": [f"shards/{s}" for s in sorted(counts) if s in base.whole],
           "boundary": ({"shard": f"shards/{base.boundary}", "max_rank": str(base.max_rank),
                         "count": counts.get(base.boundary, 0)} if base.boundary in counts else None),
           "within": within or "", "truncated": False,
           "rule": "a sample its base rule takes (the shards and boundary below)"
                   + (f" whose score in scores/NAME/shard-NNNNN.parquet is "
                      f"{'at most score.max' if max_score is not None else 'at least score.min'}" if scores else "")
                   + (", not one of exclude.keys (copies of evaluation images)" if exclude else "")}
    if scores:
        doc["score"] = {"name": scores, "column": column, "min": float(minimum) if np.isfinite(minimum) else None,
                        "range": [lo, hi], "asked": {"min_score": min_score, "top_fraction": top_fraction}}
        if max_score is not None:
            doc["score"].update(max=maximum, asked={**doc["score"]["asked"], "max_score": max_score})
    if exclude:
        doc["exclude"] = exclude
    return doc
