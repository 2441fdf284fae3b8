import pytest
from helpers.servers import Server

from psdclip.core import logs

logs.setup()  # library calls in tests log as under the CLI


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A small synthetic source made by the project's own generator (300 pairs, 40 held-out scenes)."""
    from psdclip.pipeline.config import SynthConfig
    from psdclip.pipeline.synth import generate

    out = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(out=str(out), n=300, seed=3, heldout=40, image_size=64), progress=False)
    return out


@pytest.fixture(scope="session")
def scheduler():
    """One real Dask cluster (2 worker processes, img2dataset imported once) shared by the pipeline tests that are
    not about starting one: their builds connect with --dask-scheduler, as on a real cluster. Starting a
    LocalCluster per build is tested by the dataset fixture, the crash and cluster tests, and the recipes."""
    import logging

    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster:
        with Client(cluster) as client:
            client.run(lambda: __import__("img2dataset.downloader"))
        yield cluster.scheduler_address


@pytest.fixture()
def server(synth_dir):
    """A real HTTP server on 127.0.0.1 serving the synthetic images under /img/ and faults under /bad/."""
    with Server(str(synth_dir), slow_s=3.0) as srv:
        yield srv


@pytest.fixture()
def synth_urls(synth_dir, server, tmp_path):
    """A URL list (csv) of the synthetic source pointing at the test server."""
    import pandas as pd

    attrs = pd.read_parquet(synth_dir / "attributes.parquet")
    path = tmp_path / "urls.csv"
    pd.DataFrame({"url": server.base + "/img/" + attrs["path"], "caption": attrs["caption"]}).to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def dataset_dir(synth_dir, tmp_path_factory):
    """A dataset made by the real pipeline from the synthetic source (300 pairs, 64 px, 3 shards)."""
    import pandas as pd

    from psdclip.pipeline.build import build
    from psdclip.pipeline.config import BuildConfig

    out = tmp_path_factory.mktemp("dataset")
    with Server(str(synth_dir)) as srv:
        attrs = pd.read_parquet(synth_dir / "attributes.parquet")
        urls = out / "urls.csv"
        pd.DataFrame({"url": srv.base + "/img/" + attrs["path"], "caption": attrs["caption"]}).to_csv(urls, index=False)
        build(BuildConfig(inputs=[str(urls)], out=str(out / "ds"), image_size=64, shard_size=100, processes_count=2,
                          thread_count=8, subsets=["0.1", "1.0"], progress=False))
    return out / "ds"


@pytest.fixture(scope="session")
def runs(dataset_dir, tmp_path_factory):
    """Three short tiny-model runs on the pipeline-built dataset (CLIP seed 0, PSD seed 0, CLIP seed 1), shared
    by the eval, compare and index tests."""
    from helpers.cli import cli

    root = tmp_path_factory.mktemp("runs")
    out = []
    for loss, seed in (("clip", 0), ("psd", 0), ("clip", 1)):
        run = root / f"{loss}{seed}"
        cli("train", "--data", dataset_dir, "--out", run, "--steps", 6, "--batch-size", 32, "--workers", 1,
            "--loss", loss, "--seed", seed, "--no-progress", "--warmup", 2)
        out.append(run)
    return out
