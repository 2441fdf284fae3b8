"""Nested subsets for scaling-law runs.

Every successful key gets a pseudo-random rank from a hash of (seed, shard) then (seed, key); a subset of
size n is the n keys of lowest rank. So every smaller subset is contained in every larger one, a subset never copies
images (it lists shards and keys), and subsets can span any number of orders of magnitude.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pandas as pd

from .errors import InputError


def parse_subsets(specs) -> list[tuple[str, float]]:
    """'0.01,0.1,1.0' or ['0.01', '1000'] -> [(name, size)]; size <= 1 is a fraction, > 1 a count."""
    items: list[str] = []
    for s in specs or []:
        items += [p.strip() for p in str(s).split(",") if p.strip()]
    out = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise InputError(f"--subsets {item!r}: expected a fraction in (0, 1] or a count > 1") from None
        if not value > 0 or math.isinf(value) or math.isnan(value):
            raise InputError(f"--subsets {item!r}: expected a fraction in (0, 1] or a count > 1")
        if value > 1 and value != int(value):
            raise InputError(f"--subsets {item!r}: a count must be a whole number")
        name = _format_pct(value) if value <= 1 else f"n{int(value)}"
        out.append((name, value))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise InputError(f"--subsets: repeated subset in {','.join(items)}")
    return out


def _format_pct(fraction: float) -> str:
    pct = fraction * 100
    text = f"{pct:.6f}".rstrip("0").rstrip(".")
    return text.replace(".", "_") + "pct"


def subset_rank(keys: pd.Series, seed: int) -> np.ndarray:
    """A stable pseudo-random order key for each key (independent of row order and of other keys)."""
    salt = f"{seed}:".encode()
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(salt + k.encode(), digest_size=8).digest(), "little") for k in keys),
        dtype=np.uint64, count=len(keys))


def build_subsets(success: pd.DataFrame, specs: list[tuple[str, float]], seed: int) -> dict[str, dict]:
    """success: rows with columns key, shard. Returns {name: subset document}.

    The order is shard-major (shards in a seeded random order, keys in a seeded random order inside each
    shard), so a small subset lies in few shards and a reader does not scan the whole dataset to find it;
    shards are already random partitions of the input (see plan.assign_shards)."""
    shard_rank = subset_rank(success["shard"].astype(str), seed + 1)
    order = success.assign(_shard=shard_rank, _rank=subset_rank(success["key"], seed)).sort_values(
        ["_shard", "_rank", "key"], kind="stable")
    total = len(order)
    docs = {}
    for name, size in specs:
        requested = round(size * total) if size <= 1 else int(size)
        if size <= 1:
            requested = max(1, requested) if total else 0
        n = min(requested, total)
        part = order.iloc[:n]
        docs[name] = {
            "name": name,
            "size": size,
            "requested": requested,
            "count": n,
            "seed": seed,
            "of_total": total,
            "truncated": n < requested,
            "shards": sorted(part["shard"].unique().tolist()),
            "keys": part["key"].tolist(),
        }
    return docs
