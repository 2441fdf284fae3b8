"""Per-sample scores beside the manifest (DATASET/scores/NAME/, written by `psdclip data score`) and the subsets that
threshold them (`psdclip data subset`): the layout and its one reader, readable without psdclip (plain Parquet).

A score subset is written as subsets/NAME.json like any subset (shards plus a per-key rule), with a `score` rule
on top: a sample is in it when the base rule takes it (the whole dataset, or the nested subset given with
--within) and its score in its shard's score file is at least `min`. The threshold of --top-fraction is found
from a histogram of the scores (20,000 bins over [-1, 1], so within 1e-4 of the exact quantile), never by a global
sort: the client holds the histogram and one shard's scores at a time. Readers (the trainer's loader) decide each
sample from its shard's score file, one shard's kept keys cached at a time.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import pyarrow.parquet as pq

from ..core.errors import InputError
from ..core.io import read_json
from .format import SCORE_COLUMN as COLUMN, DatasetLayout, dataset_id, read_info, score_folder

BINS = 20_000


def check_made_for(dataset: str, name: str) -> dict:
    """score.json of NAME, refused when it is missing or was made for another dataset."""
    path = os.path.join(score_folder(dataset, name), "score.json")
    if not os.path.isfile(path):
        raise InputError(f"--score {name}: no such scores in {dataset}/scores (make them with `psdclip data score`)")
    doc = read_json(path)
    if doc.get("dataset_id") != dataset_id(read_info(dataset)):
        raise InputError(f"--score {name}: made for another dataset (id {doc.get('dataset_id')})")
    return doc


def read_scores(dataset: str, name: str, shard: int, column: str = COLUMN):
    """(keys, scores) of one shard's score file; a one-line error when it is missing."""
    folder = score_folder(dataset, name)
    path = os.path.join(folder, f"shard-{shard:05d}.parquet")
    if not os.path.isfile(path):
        raise InputError(f"{folder}: no scores for shard {shard} (run the `psdclip data score` command to its end)")
    names = pq.read_schema(path).names
    if column not in names:
        raise InputError(f"--column {column}: not in the scores {name} (its columns: "
                         f"{', '.join(n for n in names if n != 'key')}; nn_similarity comes from `psdclip data score "
                         f"--near-duplicates`)")
    t = pq.read_table(path, columns=["key", column])
    return np.asarray(t.column("key").to_pylist(), dtype=object), t.column(column).to_numpy().astype(np.float64)


@functools.lru_cache(maxsize=2)
def kept_keys(dataset: str, name: str, column: str, minimum: float, maximum: float, shard: int) -> frozenset:
    keys, scores = read_scores(dataset, name, shard, column)
    return frozenset(keys[(scores >= minimum) & (scores <= maximum)].tolist())


def threshold_for(hist: np.ndarray, fraction: float) -> float:
    """The score at which the top `fraction` of the histogrammed samples begins (a bin edge)."""
    edges = np.linspace(-1.0, 1.0, BINS + 1)
    total = int(hist.sum())
    want = max(1, int(round(fraction * total)))
    above = np.cumsum(hist[::-1])  # samples in the top j+1 bins
    j = int(np.searchsorted(above, want))
    return float(edges[BINS - 1 - min(j, BINS - 1)])


def score_subset(dataset: str, name: str, scores: str | None, column: str, min_score: float | None,
                 top_fraction: float | None, within: str | None, exclude_near: str | None = None,
                 max_hamming: int = 8, max_score: float | None = None) -> dict:
    """The subset document of a score threshold and/or a decontamination (see the module docstring and
    decontam.py): the base rule (the dataset, or --within's subset), the threshold on top, the copies of
    evaluation images left out."""
    from .reader import success_keys
    from .subsets import SubsetRule

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
        from .format import shard_format, shard_name

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
        from .decontam import Decontaminator

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
