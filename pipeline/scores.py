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
from .format import SCORE_COLUMN as COLUMN
from .format import dataset_id, read_info, score_folder

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
