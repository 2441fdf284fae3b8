import itertools

import pandas as pd

from helpers.datasets import cfg

from psdclip.pipeline.clean import start
from psdclip.pipeline.keys import url_key
from psdclip.pipeline.dataset import Layout
from psdclip.pipeline.ingest import ingest_inputs
from psdclip.pipeline.plan import assign_shards


def frame(urls, hosts=None, status=None):
    df = start(pd.DataFrame({"url": urls, "caption": "c", "source": "list.csv", "source_row": range(len(urls))}))
    df["host"] = hosts if hosts is not None else [u.split("/")[2] for u in urls]
    if status is not None:
        df["status"] = status
    return df


def ingest_csv(tmp_path, scheduler, name, rows, earlier=(), ds="ds"):
    """Plan one csv list (after the lists in `earlier`) with the partitioned ingest on the shared cluster."""
    from dask.distributed import Client

    layout = Layout(str(tmp_path / ds))
    layout.create()
    with Client(scheduler) as client:
        for i, (n, r) in enumerate(list(earlier) + [(name, rows)]):
            pd.DataFrame(r, columns=["url", "caption"]).to_csv(tmp_path / n, index=False)
            ingest_inputs(client, layout, cfg([tmp_path / n], layout.root))
    return layout.load_plan(len(earlier)).sort_values("source_row").reset_index(drop=True)


def test_duplicates_keep_the_first_and_keys_are_stable_and_unique(tmp_path, scheduler):
    urls = ["http://a.test/1", "http://a.test/2", "http://a.test/1", "http://a.test/1"]
    df = ingest_csv(tmp_path, scheduler, "l.csv", [(u, "c") for u in urls])
    assert df["status"].tolist() == ["pending", "pending", "duplicate_url", "duplicate_url"]
    assert df.loc[0, "key"] == url_key("http://a.test/1")
    assert df["key"].is_unique
    again = ingest_csv(tmp_path, scheduler, "l.csv", [(u, "c") for u in urls], ds="again")
    assert again["key"].tolist() == df["key"].tolist()


def test_duplicates_against_the_existing_dataset_and_filtered_rows_dont_count(tmp_path, scheduler):
    rows = [("http://a.test/1", "c"), ("http://a.test/2", ""), ("http://a.test/2", "c")]
    df = ingest_csv(tmp_path, scheduler, "new.csv", rows, earlier=[("old.csv", [("http://a.test/1", "c")])])
    assert df["status"].tolist() == ["duplicate_url", "empty_caption", "pending"]
    assert df["key"].is_unique


def test_hosts_are_spread_over_partitions_and_interleaved():
    urls = [f"http://big.test/{i}" for i in range(90)] + [f"http://h{i}.test/x" for i in range(30)]
    df = assign_shards(frame(urls), shard_size=40, first_shard=7)
    sizes = df.groupby("shard").size()
    assert sorted(sizes.index) == [7, 8, 9] and sizes.max() - sizes.min() <= 1
    big = df[df["host"] == "big.test"]
    assert big.groupby("shard").size().max() - big.groupby("shard").size().min() <= 1
    for _, part in df.sort_values("order").groupby("shard"):
        assert part["order"].tolist() == list(range(len(part)))
        hosts = part["host"].tolist()
        longest = max(len(list(g)) for _, g in itertools.groupby(hosts))
        # the big host has 3x the rows of all others together: runs stay short when interleaved
        assert longest <= 3 * len(part) // 4


def test_only_pending_rows_get_shards():
    df = assign_shards(frame(["http://a.test/1", "file:///x"], status=["pending", "invalid_url"]), 10, 0)
    assert df["shard"].tolist() == [0, -1]
