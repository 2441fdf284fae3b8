"""URL lists on S3 (a real S3-compatible server on 127.0.0.1: moto's server mode), read in parts by the Dask workers."""
import io
import json
import os
import time

import pandas as pd
import pytest

from helpers.datasets import cfg
from helpers.s3 import moto_s3

from psdclip.pipeline import parts as parts_mod
from psdclip.pipeline.build import build
from psdclip.pipeline.keys import url_keys


def _set_env(env):
    """On a worker: set (None: unset) environment variables (os.environ itself, not a pickled copy of it)."""
    import os

    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    from s3fs import S3FileSystem

    S3FileSystem.clear_instance_cache()  # file systems made for an earlier test's server (another port)


@pytest.fixture()
def s3(monkeypatch, scheduler):
    """A moto S3 server on loopback; the AWS variables set here and on the shared cluster's workers (as a real
    cluster's workers get them from their environment)."""
    from dask.distributed import Client

    with moto_s3(monkeypatch) as env:
        with Client(scheduler) as client:
            client.run(_set_env, env)
        _set_env(env)
        import fsspec

        fsspec.filesystem("s3", skip_instance_cache=True).makedirs("lists", exist_ok=True)  # (moto: state per process)
        yield scheduler
        with Client(scheduler) as client:
            client.run(_set_env, {k: None for k in env})


def test_url_lists_on_s3_are_cut_into_parts_and_read_by_the_workers(s3, synth_dir, server, tmp_path, monkeypatch):
    import fsspec

    attrs = pd.read_parquet(synth_dir / "attributes.parquet")
    urls = (server.base + "/img/" + attrs["path"]).tolist()
    df = pd.DataFrame({"url": urls + urls[:20], "caption": attrs["caption"].tolist() + attrs["caption"][:20].tolist()})
    with fsspec.open("s3://lists/urls.csv", "w") as f:
        df.to_csv(f, index=False)
    monkeypatch.setattr(parts_mod, "SPLIT_BYTES", 4000)  # the client cuts it: ranged reads of the S3 object
    monkeypatch.setattr(parts_mod, "PART_BYTES", 8000)
    ds = tmp_path / "ds"
    stats = build(cfg(["s3://lists/urls.csv"], ds, dask_scheduler=s3))
    m = pd.read_parquet(ds / "manifest")
    assert len(m) == 320 and m["key"].is_unique and set(m["source"]) == {"s3://lists/urls.csv"}
    assert (m["status"] == "success").sum() == 300 and (m["status"] == "duplicate_url").sum() == 20
    assert set(m.loc[m["status"] == "success", "key"]) == set(url_keys(urls))
    assert stats["success"] == 300
    again = build(cfg(["s3://lists/urls.csv"], ds, dask_scheduler=s3))  # recognised by the sha256 of the object's bytes
    assert again["build"]["nothing_to_do"]


def _objects(fs, prefix):
    return [p for p in fs.find(prefix)]


def test_a_dataset_folder_on_s3_is_built_resumed_retried_and_streamed(s3, synth_dir, server, tmp_path):
    """--out s3://...: the workers write shards, plans and manifest parts as objects (no shared mount, nothing local),
    a rerun finds everything done, --retry-failed publishes a retry ingest there, and the trainer streams a subset."""
    import socket
    import tarfile

    import fsspec
    import pyarrow.dataset as pads

    from psdclip.pipeline.stats import stream_stats
    from psdclip.pipeline.subsets import member_keys
    from psdclip.train.data import ShardStream, resolve_source
    from psdclip.train.models import build_model

    attrs = pd.read_parquet(synth_dir / "attributes.parquet").head(120)
    urls = (server.base + "/img/" + attrs["path"]).tolist()
    with socket.socket() as sock:  # a port nobody listens on: connection errors, a transient status
        sock.bind(("127.0.0.1", 0))
        dead = [f"http://127.0.0.1:{sock.getsockname()[1]}/img/{i}.jpg" for i in range(10)]
    lst = tmp_path / "urls.csv"
    pd.DataFrame({"url": urls + dead + ["ftp://example.com/a.jpg"],
                  "caption": attrs["caption"].tolist() + ["a dead link"] * 10 + ["not http"]}).to_csv(lst, index=False)
    fs = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)
    fs.makedirs("datasets", exist_ok=True)
    out = "s3://datasets/cc/ds"
    stats = build(cfg([lst], out, dask_scheduler=s3, subsets=["0.5", "1.0"], shard_size=50))
    assert stats["rows"] == 131 and stats["success"] == 120 and stats["counts"]["connection_error"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["urls.csv"]  # nothing written locally
    names = [p.rsplit("/", 1)[-1] for p in _objects(fs, "datasets/cc/ds")]
    assert not [n for n in names if ".tmp-" in n] and not fs.exists("datasets/cc/ds/_work")
    assert not fs.exists("datasets/cc/ds/_state/build.lock")  # released
    # the manifest is one table to pyarrow.dataset over S3, one row per input row
    m = pads.dataset("datasets/cc/ds/manifest", filesystem=fs, format="parquet").to_table().to_pandas()
    assert len(m) == 131 and m["key"].is_unique
    ok = set(m.loc[m["status"] == "success", "key"])
    in_tars = set()
    shards = sorted(p for p in fs.ls("datasets/cc/ds/shards") if p.endswith(".tar"))
    assert len(shards) == 3  # 130 rows to download, 50 a shard
    for p in shards:
        with fs.open(p, "rb") as f, tarfile.open(fileobj=f) as tf:
            in_tars |= {n.split(".")[0] for n in tf.getnames() if n.endswith(".jpg")}
    assert in_tars == ok
    assert stream_stats(out)["shard_bytes"] == sum(fs.size(p) for p in shards)
    assert build(cfg([lst], out, dask_scheduler=s3))["build"]["nothing_to_do"]
    # --retry-failed: a retry ingest published on S3; the manifest still has one row per input row
    retried = build(cfg([], out, dask_scheduler=s3, retry_failed=True, shard_size=50))
    assert retried["rows"] == 131 and retried["counts"]["connection_error"] == 10
    info = json.loads(fs.cat("datasets/cc/ds/dataset.json"))
    assert [i["kind"] for i in info["ingests"]] == ["urls", "retry"]
    dead_shards = {int(s) for s in m.loc[m["status"] == "connection_error", "shard"]}
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("datasets/cc/ds/_state/ingests/00001/replaced")) == sorted(
        [".keep"] + [f"shard-{s:05d}.parquet" for s in dead_shards])  # a finalize task reads its shard's file alone
    m2 = pads.dataset("datasets/cc/ds/manifest", filesystem=fs, format="parquet").to_table().to_pandas()
    assert len(m2) == 131 and m2["key"].is_unique and set(m2.loc[m2["status"] == "success", "key"]) == ok
    assert set(m2.loc[m2["status"] == "connection_error", "ingest"]) == {1}
    # the trainer reads a subset from S3: what it streams is the subset's members
    _, transform, _, tok = build_model("tiny")
    spec = f"{out}/subsets/50pct.json"
    src = resolve_source(spec)
    assert src.samples == 60 and all(s.startswith("s3://") for s in src.shards)
    it = iter(ShardStream(spec, 20, transform, tok, shuffle_buffer=10))
    assert {k for _ in range(3) for k in next(it)["keys"]} == member_keys(src.root, src.rule)
    # ... and `index build` reads every stored image from there (its shard reader, and by offset for the service)
    from PIL import Image

    from psdclip.index.embed import ShardBatches
    from psdclip.pipeline.reader import read_image_bytes, success_rows

    rows, fmt = success_rows(out)
    batches = ShardBatches(out, fmt, [(int(s), g["key"].tolist()) for s, g in rows.groupby("shard")], transform,
                           (64, 64), 16)
    assert sum(int(ok.sum()) for _, _, _, ok in batches) == len(rows) == 120
    r = rows.iloc[7]
    with Image.open(io.BytesIO(read_image_bytes(out, fmt, int(r["shard"]), int(r["offset"]), int(r["size"])))) as im:
        assert im.size == (32, 32)


def test_a_lock_left_by_another_host_and_a_missing_bucket_are_one_line_errors(s3, tmp_path):
    import fsspec

    from psdclip.core.errors import InputError

    fs = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)
    fs.makedirs("locked", exist_ok=True)
    fs.pipe_file("locked/ds/_state/build.lock", json.dumps({"pid": 1, "host": "elsewhere", "since": "x"}).encode())
    lst = tmp_path / "urls.csv"
    lst.write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a\n")
    with pytest.raises(InputError, match="elsewhere.*remove s3://locked/ds/_state/build.lock"):
        build(cfg([lst], "s3://locked/ds", dask_scheduler=s3))
    assert fs.exists("locked/ds/_state/build.lock")  # not taken
    with pytest.raises(InputError, match="--out s3://no-such-bucket/ds: cannot write there .*bucket does not exist"):
        build(cfg([lst], "s3://no-such-bucket/ds", dask_scheduler=s3))


def _work_folder(root, rows):
    """On a worker: a work folder of a download task of a build on an object store, as the task makes it (rows None:
    remove them)."""
    import glob
    import shutil
    import tempfile

    from psdclip.pipeline.download import work_prefix

    if rows is None:
        for d in glob.glob(os.path.join(tempfile.gettempdir(), work_prefix(root) + "*")):
            shutil.rmtree(d)
        return 0
    d = tempfile.mkdtemp(prefix=work_prefix(root) + "00003-")
    with open(os.path.join(d, "rows-done"), "w") as f:
        f.write(str(rows))
    return rows


def test_the_progress_of_shards_in_flight_is_read_on_the_workers(scheduler):
    """A build on an object store downloads in each worker's temporary folder: the client's progress bar asks the
    workers for the rows written so far (each worker its own folders: the two here share one /tmp)."""
    from dask.distributed import Client

    from psdclip.pipeline.build import _in_flight_counter
    from psdclip.pipeline.dataset import Layout

    layout = Layout("s3://datasets/progress")
    with Client(scheduler) as client:
        made = client.run(_work_folder, layout.root, 7)
        other = client.run(_work_folder, "s3://datasets/other", 5)  # another build's folders are not counted
        try:
            assert len(made) == 2 and len(other) == 2
            # the workers are asked in a thread of the client's (a hung worker must not hang its poll): the first
            # polls answer what is known so far, the count arrives once the workers have answered
            count, seen, deadline = _in_flight_counter(client, layout), [], time.time() + 30
            while time.time() < deadline and (not seen or seen[-1] != 14):
                seen.append(count())
                time.sleep(0.05)
            assert seen[-1] == 14 and set(seen) <= {0, 14}, seen
        finally:
            client.run(_work_folder, layout.root, None)
            client.run(_work_folder, "s3://datasets/other", None)
