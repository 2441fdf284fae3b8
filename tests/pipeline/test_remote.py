"""URL lists on S3 (a real S3-compatible server on 127.0.0.1: moto's server mode), read in parts by the Dask workers."""
import os

import pandas as pd
import pytest

from helpers.datasets import cfg

from psdclip.pipeline import ingest as ingest_mod
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


@pytest.fixture()
def s3(monkeypatch, scheduler):
    """A moto S3 server on loopback; the AWS variables set here and on the shared cluster's workers (as a real
    cluster's workers get them from their environment)."""
    from dask.distributed import Client

    from moto.server import ThreadedMotoServer

    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
        monkeypatch.setenv(k, v)
    env = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                      "AWS_ENDPOINT_URL")}
    with Client(scheduler) as client:
        client.run(_set_env, env)
    import fsspec

    fsspec.filesystem("s3", skip_instance_cache=True).mkdir("lists")
    yield scheduler
    with Client(scheduler) as client:
        client.run(_set_env, {k: None for k in env})
    srv.stop()


def test_url_lists_on_s3_are_cut_into_parts_and_read_by_the_workers(s3, synth_dir, server, tmp_path, monkeypatch):
    import fsspec

    attrs = pd.read_parquet(synth_dir / "attributes.parquet")
    urls = (server.base + "/img/" + attrs["path"]).tolist()
    df = pd.DataFrame({"url": urls + urls[:20], "caption": attrs["caption"].tolist() + attrs["caption"][:20].tolist()})
    with fsspec.open("s3://lists/urls.csv", "w") as f:
        df.to_csv(f, index=False)
    monkeypatch.setattr(ingest_mod, "SPLIT_BYTES", 4000)  # the client cuts it: ranged reads of the S3 object
    monkeypatch.setattr(ingest_mod, "PART_BYTES", 8000)
    ds = tmp_path / "ds"
    stats = build(cfg(["s3://lists/urls.csv"], ds, dask_scheduler=s3))
    m = pd.read_parquet(ds / "manifest")
    assert len(m) == 320 and m["key"].is_unique and set(m["source"]) == {"s3://lists/urls.csv"}
    assert (m["status"] == "success").sum() == 300 and (m["status"] == "duplicate_url").sum() == 20
    assert set(m.loc[m["status"] == "success", "key"]) == set(url_keys(urls))
    assert stats["success"] == 300
    again = build(cfg(["s3://lists/urls.csv"], ds, dask_scheduler=s3))  # recognised by the sha256 of the object's bytes
    assert again["build"]["nothing_to_do"]
