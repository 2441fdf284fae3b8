"""Nested subsets for scaling-law runs.

Every successful key gets a pseudo-random rank from a hash of (seed, shard) then (seed, key); a subset of
size n is the n keys of lowest rank. So every smaller subset is contained in every larger one, a subset never
copies images nor lists keys (it names shards, plus one boundary shard and a rank threshold), and subsets can
span any number of orders of magnitude.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os

import numpy as np
import pandas as pd

from ..core.errors import InputError
from .reader import success_keys
from .scores import kept_keys


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


def build_subsets(counts: dict[str, int], keys_of, specs: list[tuple[str, float]], seed: int) -> dict[str, dict]:
    """counts: shard name -> successful samples; keys_of(shard name): that shard's successful keys (asked only for
    a subset's boundary shard). Returns {name: subset document}.

    The order is shard-major: shards in a seeded random order (shards are already random partitions of the
    input, see ingest.py), keys in a seeded random order (subset_rank) inside each shard. A subset of size n is
    the first n samples of that order, so a document names the shards it takes whole plus at most one boundary
    shard, from which it takes the keys whose rank is at most `max_rank`: a reader decides each sample's
    membership from its key alone (SubsetRule), no key list is written, and every smaller subset is contained in
    every larger one. The client needs per shard only its count and, for a boundary shard, its keys' ranks."""
    shards = sorted((s for s, n in counts.items() if n), key=lambda s: (int(subset_rank([str(s)], seed + 1)[0]), str(s)))
    sizes = np.array([counts[s] for s in shards], dtype=np.int64)
    ends = np.cumsum(sizes)
    total = int(ends[-1]) if len(ends) else 0
    docs = {}
    for name, size in specs:
        requested = round(size * total) if size <= 1 else int(size)
        if size <= 1:
            requested = max(1, requested) if total else 0
        n = min(requested, total)
        whole = int(np.searchsorted(ends, n, side="right"))  # shards that fit entirely in the first n
        taken = int(ends[whole - 1]) if whole else 0
        boundary = None
        if n > taken:
            shard = shards[whole]
            ranks = np.sort(subset_rank(list(keys_of(shard)), seed))
            boundary = {"shard": shard, "max_rank": str(int(ranks[n - taken - 1])), "count": n - taken}
        docs[name] = {
            "name": name,
            "size": size,
            "requested": requested,
            "count": n,
            "seed": seed,
            "of_total": total,
            "truncated": n < requested,
            "rule": "a sample of a listed shard, or of the boundary shard with subset_rank(key, seed) <= max_rank "
                    "(blake2b-64 of 'seed:key', little-endian); successful samples only",
            "shards": [str(s) for s in shards[:whole]],
            "boundary": boundary,
        }
    return docs


@dataclasses.dataclass(frozen=True)
class SubsetRule:
    """Membership of one sample of a subset, decided from its shard and key (picklable: loader workers get it).
    `whole`: shard names taken whole; `boundary`/`max_rank`: the one shard taken in part."""
    whole: frozenset
    boundary: str | None = None
    max_rank: int = 0
    seed: int = 0
    # a score subset (scores.py): the dataset, the scores' name and column, and the threshold
    score: tuple | None = None
    exclude: frozenset = frozenset()  # keys left out (decontamination: copies of evaluation images)

    @classmethod
    def of(cls, doc: dict, root: str | None = None) -> "SubsetRule":
        b = doc.get("boundary") or {}
        sc = doc.get("score")
        if sc and root is None:
            raise InputError(f"subset {doc.get('name')}: a score subset is read with its dataset folder")
        return cls(whole=frozenset(os.path.basename(s) for s in doc["shards"]),
                   boundary=os.path.basename(b["shard"]) if b else None, max_rank=int(b.get("max_rank", 0)),
                   seed=int(doc.get("seed", 0)),
                   score=(root, sc["name"], sc.get("column", "clip_score"),
                          -math.inf if sc.get("min") is None else float(sc["min"]),
                          math.inf if sc.get("max") is None else float(sc["max"])) if sc else None,
                   exclude=frozenset((doc.get("exclude") or {}).get("keys", [])))

    def _scored(self, shard: str) -> frozenset:
        root, name, column, minimum, maximum = self.score
        return kept_keys(root, name, column, minimum, maximum, int(shard.split(".")[0]))

    def shards(self) -> list[str]:
        """Every shard the subset reads from (names)."""
        return sorted(self.whole | ({self.boundary} if self.boundary else set()))

    def keep(self, shard: str, key: str) -> bool:
        if key in self.exclude:
            return False
        if self.score is not None and key not in self._scored(shard):
            return False
        if shard in self.whole:
            return True
        return shard == self.boundary and int(subset_rank([key], self.seed)[0]) <= self.max_rank

    def keeps(self, shard: str, keys) -> np.ndarray:
        """A mask over `keys` of shard `shard` (its file name): which of them are in the subset."""
        if shard in self.whole:
            mask = np.ones(len(keys), dtype=bool)
        elif shard != self.boundary:
            return np.zeros(len(keys), dtype=bool)
        else:
            mask = subset_rank(keys, self.seed) <= np.uint64(self.max_rank)
        if self.score is not None:
            kept = self._scored(shard)
            mask &= np.fromiter((k in kept for k in keys), dtype=bool, count=len(keys))
        if self.exclude:
            mask &= np.fromiter((k not in self.exclude for k in keys), dtype=bool, count=len(keys))
        return mask


def member_keys(root: str, rule: SubsetRule) -> set[str]:
    """Every key of a subset (for tools and tests; readers decide per sample): the successful rows of its shards'
    manifest files that the rule takes."""
    out: set[str] = set()
    for shard in rule.shards():
        keys = success_keys(root, int(shard.split(".")[0]))
        out.update(keys[rule.keeps(shard, keys)].tolist())
    return out
