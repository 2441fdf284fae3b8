import json

import pandas as pd
import pytest

from psdclip.core.errors import InputError
from psdclip.pipeline.subsets import SubsetRule, build_subsets, parse_subsets, subset_rank


def test_parse():
    assert parse_subsets(["0.01,0.1", "1.0", "500"]) == [("1pct", 0.01), ("10pct", 0.1), ("100pct", 1.0), ("n500", 500.0)]
    assert parse_subsets(["0.005"]) == [("0_5pct", 0.005)]
    for bad in (["0"], ["-1"], ["x"], ["2.5"], ["0.1,0.1"]):
        with pytest.raises(InputError):
            parse_subsets(bad)


def subsets_of(keys, specs, seed):
    """build_subsets over a frame of (key, shard): its counts, and a boundary shard's keys from the frame."""
    return build_subsets(keys.groupby("shard").size().to_dict(),
                         lambda shard: keys.loc[keys["shard"] == shard, "key"].tolist(), specs, seed)


def _members(docs, keys):
    """name -> the keys each subset's rule takes, decided per key (as a reader does)."""
    out = {}
    for name, doc in docs.items():
        rule = SubsetRule.of(doc)
        out[name] = {k for shard, grp in keys.groupby("shard") for k in grp["key"][rule.keeps(shard, grp["key"].tolist())]}
    return out


def test_subsets_are_nested_rules_and_span_orders_of_magnitude():
    keys = pd.DataFrame({"key": [f"{i:08x}" for i in range(20_000)], "shard": [f"{i // 1000:05d}.tar" for i in range(20_000)]})
    docs = subsets_of(keys, parse_subsets(["0.001,0.01,0.1,1.0,50000"]), seed=1)
    names = ["0_1pct", "1pct", "10pct", "100pct"]
    assert [docs[n]["count"] for n in names] == [20, 200, 2000, 20000]
    assert all("keys" not in d for d in docs.values())
    assert len(json.dumps(docs["100pct"])) < 2000  # shard names and a threshold, whatever the number of keys
    members = _members(docs, keys)
    assert [len(members[n]) for n in names] == [20, 200, 2000, 20000]
    for small, large in zip(names, names[1:]):
        assert members[small] <= members[large]
        assert set(SubsetRule.of(docs[small]).shards()) <= set(SubsetRule.of(docs[large]).shards())
    assert len(SubsetRule.of(docs["1pct"]).shards()) == 1  # shard-major: a small subset lies in few shards
    assert docs["10pct"]["boundary"] is None and len(docs["10pct"]["shards"]) == 2  # two whole shards
    assert docs["n50000"]["truncated"] and docs["n50000"]["count"] == 20000
    # the first n of the seeded shard-major order (shards by rank, then keys by rank): the rule matches it exactly
    order = keys.assign(s=subset_rank(keys["shard"], 2), k=subset_rank(keys["key"], 1)).sort_values(["s", "k"])
    for n in ("0_1pct", "1pct"):
        assert members[n] == set(order["key"].iloc[:docs[n]["count"]])
    # independent of row order, dependent on the seed
    shuffled = subsets_of(keys.sample(frac=1, random_state=0), parse_subsets(["0.01"]), seed=1)
    assert shuffled["1pct"] == docs["1pct"]
    assert _members(subsets_of(keys, parse_subsets(["0.01"]), seed=2), keys)["1pct"] != members["1pct"]
