import itertools

import pandas as pd

from psdclip.pipeline.clean import start
from psdclip.pipeline.keys import url_key
from psdclip.pipeline.plan import assign_shards, mark_duplicates


def frame(urls, hosts=None, status=None):
    df = start(pd.DataFrame({"url": urls, "caption": "c", "source": "list.csv", "source_row": range(len(urls))}))
    df["host"] = hosts if hosts is not None else [u.split("/")[2] for u in urls]
    if status is not None:
        df["status"] = status
    return df


def test_duplicates_keep_the_first_and_keys_are_stable_and_unique():
    urls = ["http://a.test/1", "http://a.test/2", "http://a.test/1", "http://a.test/1"]
    df = mark_duplicates(frame(urls))
    assert df["status"].tolist() == ["pending", "pending", "duplicate_url", "duplicate_url"]
    assert df.loc[0, "key"] == url_key("http://a.test/1")
    assert df["key"].is_unique
    again = mark_duplicates(frame(urls))
    assert again["key"].tolist() == df["key"].tolist()


def test_duplicates_against_the_existing_dataset_and_filtered_rows_dont_count():
    urls = ["http://a.test/1", "http://a.test/2", "http://a.test/2"]
    df = mark_duplicates(frame(urls, status=["pending", "empty_caption", "pending"]), {url_key("http://a.test/1")})
    assert df["status"].tolist() == ["duplicate_url", "empty_caption", "pending"]
    assert df["key"].is_unique


def test_hosts_are_spread_over_partitions_and_interleaved():
    urls = [f"http://big.test/{i}" for i in range(90)] + [f"http://h{i}.test/x" for i in range(30)]
    df = assign_shards(mark_duplicates(frame(urls)), shard_size=40, first_shard=7)
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
    df = assign_shards(mark_duplicates(frame(["http://a.test/1", "file:///x"], status=["pending", "invalid_url"])), 10, 0)
    assert df["shard"].tolist() == [0, -1]
