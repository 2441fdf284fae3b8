"""Dataset figures streamed over the manifest a batch at a time equal those computed on the whole table with pandas."""
import numpy as np
import pandas as pd
import pytest

import pyarrow as pa
import pyarrow.parquet as pq

from psdclip.pipeline.dataset import Layout
from psdclip.pipeline.stats import StatsAccumulator, stream_stats
from psdclip.pipeline.format import MANIFEST_COLUMNS, MANIFEST_SCHEMA, manifest_file
from psdclip.pipeline.reader import manifest_batches


def write_manifest(layout, m):
    """The manifest's partitioned layout: a file per shard, one for the rows that reached no shard."""
    import os

    os.makedirs(layout.manifest, exist_ok=True)
    sharded = m["shard"].notna().to_numpy()
    parts = [(manifest_file(layout.root, shard=int(s)), rows) for s, rows in m[sharded].groupby("shard")]
    parts.append((manifest_file(layout.root, ingest=0), m[~sharded]))
    for path, rows in parts:
        pq.write_table(pa.Table.from_pandas(rows[MANIFEST_COLUMNS], schema=MANIFEST_SCHEMA, preserve_index=False), path)


def _manifest(n=5000, seed=0):
    rng = np.random.default_rng(seed)
    status = rng.choice(["success", "success", "success", "timeout", "http_4xx", "duplicate_image", "invalid_url"], n)
    shard = pd.array(np.where(status == "invalid_url", -1, rng.integers(0, 12, n)), dtype="Int64")
    shard[shard < 0] = pd.NA
    ok = status == "success"
    sizes = {c: pd.array(np.where(ok, rng.integers(10, 400, n), -1), dtype="Int64") for c in
             ("width", "height", "original_width", "original_height", "size", "offset")}
    for v in sizes.values():
        v[~ok] = pd.NA
    hosts = rng.choice([f"h{i}.example" for i in range(40)], n)
    return pd.DataFrame({
        "key": [f"{i:020x}" for i in range(n)], "url": [f"http://{h}/{i}.jpg" for i, h in enumerate(hosts)],
        "caption": "c", "status": status, "error": "", "shard": shard, **sizes, "sha256": "",
        "source": "list.csv", "source_row": pd.array(np.arange(n), dtype="Int64"),
        "ingest": pd.array(np.zeros(n, int), dtype="Int64")})[MANIFEST_COLUMNS]


def test_streamed_stats_equal_whole_table_figures(tmp_path):
    m = _manifest()
    layout = Layout(str(tmp_path / "ds"))
    layout.create()
    write_manifest(layout, m)
    streamed = stream_stats(layout.root)
    whole = StatsAccumulator().add(m).result(layout, "webdataset")  # the whole table at once
    assert streamed == whole
    assert sum(len(b) for b in manifest_batches(layout.root, ["status"], batch_size=100)) == len(m)
    ok = m[m["status"] == "success"]
    assert streamed["counts"] == m["status"].value_counts().to_dict() and streamed["rows"] == len(m)
    for c in ("width", "original_height"):
        v = ok[c].astype(float)
        assert streamed["image_sizes"][c] == {"min": v.min(), "median": v.median(), "max": v.max(),
                                              "mean": pytest.approx(v.mean())}
    assert streamed["image_bytes"] == int(ok["size"].sum()) and streamed["attempted"] == int(m["shard"].notna().sum())
    tried = m[m["shard"].notna()].assign(host=lambda d: d["url"].str.split("/").str[2])
    fails = tried[~tried["status"].isin(["success", "duplicate_image"])]
    worst = fails["host"].value_counts()
    assert [h["failed"] for h in streamed["hosts"]] == worst.head(10).tolist()
    top = streamed["hosts"][0]
    assert top["statuses"] == fails.loc[fails["host"] == top["host"], "status"].value_counts().to_dict()
