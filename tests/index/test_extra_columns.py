"""--save-additional-columns end to end (issue 27.3): input columns travel from the URL lists into each sample's
.json, the manifest, the index metadata, `psdclip index query` and the service's /search and /knn-service answers;
a column missing from some input files is null there, not an error."""
import json
import tarfile

import pandas as pd
import requests

from helpers.cli import cli
from helpers.datasets import cfg
from helpers.servers import Server
from helpers.service import start_service

from psdclip.pipeline.build import build


def test_extra_columns_from_the_lists_to_the_service(synth_dir, tmp_path):
    attrs = pd.read_parquet(synth_dir / "attributes.parquet").iloc[:80]
    with Server(str(synth_dir)) as srv:
        df = pd.DataFrame({"url": srv.base + "/img/" + attrs["path"], "caption": attrs["caption"],
                           "license": [f"cc-by-{i}" for i in range(80)], "shape": attrs["shape"]})
        df.iloc[:50].to_csv(tmp_path / "a.csv", index=False)
        df.iloc[50:].drop(columns=["license"]).to_json(tmp_path / "b.jsonl", orient="records", lines=True)
        ds = tmp_path / "ds"
        for p in attrs["path"].iloc[10:13]:  # three rows answer 503 until --retry-failed
            srv.flaky["/img/" + p] = 10
        build(cfg([tmp_path / "a.csv", tmp_path / "b.jsonl"], ds, save_additional_columns=["license", "shape"],
                  rate_limit_retries=0))
        assert (pd.read_parquet(ds / "manifest")["status"] == "http_5xx").sum() == 3
        srv.flaky.clear()
        # --retry-failed and appends keep the dataset's columns (an append without the flag takes them)
        build(cfg([], ds, retry_failed=True))
        df.iloc[:5].assign(url=srv.base + "/img/x" + attrs["path"].iloc[:5]).to_csv(tmp_path / "c.csv", index=False)
        build(cfg([tmp_path / "c.csv"], ds))
    m = pd.read_parquet(ds / "manifest")
    ok = m[m["status"] == "success"].set_index("url")
    truth = df.set_index("url")
    assert len(ok) >= 78 and set(truth.index[10:13]) <= set(ok.index)  # the retried rows, with their columns
    in_csv = set(df["url"].iloc[:50])
    for url, row in ok.iterrows():
        assert row["shape"] == truth.loc[url, "shape"]
        if url in in_csv:
            assert row["license"] == truth.loc[url, "license"]
        else:  # b.jsonl has no license column: null there
            assert pd.isna(row["license"])
    assert ok["license"].isna().sum() == ok.index.isin(df["url"].iloc[50:]).sum() > 0
    failed = m[m["url"].str.contains("/img/x")]
    assert len(failed) == 5 and set(failed["license"]) == {f"cc-by-{i}" for i in range(5)}  # failed rows keep theirs
    # each sample's .json
    with tarfile.open(sorted((ds / "shards").glob("*.tar"))[0]) as t:
        js = [json.loads(t.extractfile(x).read()) for x in t.getmembers() if x.name.endswith(".json")]
    for j in js:
        assert j["shape"] == truth.loc[j["url"], "shape"] and "extra:shape" not in j
    # the index, its query and the service
    run = tmp_path / "run"
    cli("train", "--data", ds, "--out", run, "--model", "rn-small", "--batch-size", 16, "--steps", 2, "--workers", 0,
        "--no-progress")
    cli("index", "build", "--checkpoint", run, "--data", ds, "--out", tmp_path / "idx", "--workers", 0, "--no-progress")
    hits = json.loads(cli("index", "query", tmp_path / "idx", "--text", "a red circle", "-k", 5, "--json").stdout)
    for h in hits:
        assert h["shape"] == truth.loc[h["url"], "shape"] and "license" in h
    printed = cli("index", "query", tmp_path / "idx", "--text", "a red circle", "-k", 5).stdout
    assert f"shape={hits[0]['shape']}" in printed
    proc, base = start_service(tmp_path / "idx")
    try:
        knn = requests.post(base + "/knn-service", json={"text": "a red circle", "num_images": 5}).json()
        assert [k["shape"] for k in knn] == [h["shape"] for h in hits]
        assert [k["license"] for k in knn] == [h["license"] for h in hits]
        search = requests.post(base + "/search", json={"text": "a red circle", "k": 5}).json()["results"]
        assert [r["shape"] for r in search] == [h["shape"] for h in hits]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # a name psdclip writes itself is refused in one line; so is another set of columns for an append
    r = cli("data", "build", tmp_path / "a.csv", "--out", tmp_path / "x", "--save-additional-columns", "width",
            check=False)
    assert r.returncode == 2 and "--save-additional-columns width" in r.stderr
    r = cli("data", "build", tmp_path / "c.csv", "--out", ds, "--save-additional-columns", "license", check=False)
    assert r.returncode == 2 and "save-additional-columns" in r.stderr
