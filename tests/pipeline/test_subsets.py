import pandas as pd
import pytest

from psdclip.pipeline.errors import InputError
from psdclip.pipeline.subsets import build_subsets, parse_subsets


def test_parse():
    assert parse_subsets(["0.01,0.1", "1.0", "500"]) == [("1pct", 0.01), ("10pct", 0.1), ("100pct", 1.0), ("n500", 500.0)]
    assert parse_subsets(["0.005"]) == [("0_5pct", 0.005)]
    for bad in (["0"], ["-1"], ["x"], ["2.5"], ["0.1,0.1"]):
        with pytest.raises(InputError):
            parse_subsets(bad)


def test_subsets_are_nested_and_span_orders_of_magnitude():
    keys = pd.DataFrame({"key": [f"{i:08x}" for i in range(20_000)], "shard": [f"{i // 1000:05d}.tar" for i in range(20_000)]})
    docs = build_subsets(keys, parse_subsets(["0.001,0.01,0.1,1.0,50000"]), seed=1)
    sizes = [docs[n]["count"] for n in ("0_1pct", "1pct", "10pct", "100pct")]
    assert sizes == [20, 200, 2000, 20000]
    names = ["0_1pct", "1pct", "10pct", "100pct"]
    for small, large in zip(names, names[1:]):
        assert set(docs[small]["keys"]) <= set(docs[large]["keys"])
        assert set(docs[small]["shards"]) <= set(docs[large]["shards"])
    assert docs["n50000"]["truncated"] and docs["n50000"]["count"] == 20000
    # independent of row order, dependent on the seed
    shuffled = build_subsets(keys.sample(frac=1, random_state=0), parse_subsets(["0.01"]), seed=1)
    assert shuffled["1pct"]["keys"] == docs["1pct"]["keys"]
    assert build_subsets(keys, parse_subsets(["0.01"]), seed=2)["1pct"]["keys"] != docs["1pct"]["keys"]
