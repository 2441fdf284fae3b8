"""Integration: the real pipeline (Dask LocalCluster + img2dataset) against a real server on 127.0.0.1."""
import io
import json
import os

import pandas as pd
import pyarrow.feather as feather
import pytest
from PIL import Image

from helpers.datasets import cfg, tar_members

from psdclip.pipeline.build import build
from psdclip.pipeline.dataset import Layout
from psdclip.pipeline.stats import format_stats
from psdclip.pipeline.subsets import SubsetRule, member_keys


def test_build_webdataset_end_to_end(synth_urls, server, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    ds = tmp_path / "ds"
    stats = build(cfg([synth_urls], ds, subsets=["0.01", "0.1", "1.0"]))
    assert os.listdir(cwd) == [] and sorted(os.listdir(tmp_path)) == ["cwd", "ds", "urls.csv"]
    m = pd.read_parquet(ds / "manifest")
    assert len(m) == 300 and m["key"].is_unique
    assert (m["status"] == "success").all(), m["status"].value_counts()
    assert stats["success"] == 300 and stats["shards"] == 4
    members = tar_members(ds)
    assert set(members) == set(m["key"])
    for row in m.sample(20, random_state=0).itertuples():
        entry = members[row.key]
        assert entry["txt"].decode() == row.caption
        assert json.loads(entry["json"])["key"] == row.key
        with open(ds / "shards" / entry["shard"], "rb") as f:  # the manifest's offset points at the image
            f.seek(row.offset)
            data = f.read(row.size)
        assert data == entry["jpg"] and Image.open(io.BytesIO(data)).size == (32, 32)
        assert f"{row.shard:05d}.tar" == entry["shard"]
    # beside each shard, img2dataset's own NNNNN_stats.json (its keys), as tools written for its output read it
    for shard in range(4):
        st = json.load(open(ds / "shards" / f"{shard:05d}_stats.json"))
        assert {"count", "successes", "failed_to_download", "failed_to_resize", "duration", "start_time",
                "end_time", "status_dict"} <= set(st)
        assert st["successes"] == (m["shard"] == shard).sum() == st["count"]
    # each image was fetched exactly once; a rerun with the same list downloads nothing
    img_hits = {p: n for p, n in server.hits.items() if p.startswith("/img/")}
    assert len(img_hits) == 300 and set(img_hits.values()) == {1}
    # the manifest: a file per shard, one table for pandas (and pyarrow.dataset / DuckDB)
    assert sorted(os.listdir(ds / "manifest")) == [f"shard-{i:05d}.parquet" for i in range(4)]
    before = {p.name: p.read_bytes() for p in (ds / "manifest").iterdir()}
    # a rerun on the same list has nothing to do: it contacts no Dask scheduler at all (this one does not exist)
    build(cfg([synth_urls], ds, dask_scheduler="tcp://127.0.0.1:9"))
    assert sum(n for p, n in server.hits.items() if p.startswith("/img/")) == 300
    assert {p.name: p.read_bytes() for p in (ds / "manifest").iterdir()} == before
    subsets = {n: json.loads((ds / "subsets" / f"{n}.json").read_text()) for n in ("1pct", "10pct", "100pct")}
    assert [subsets[n]["count"] for n in ("1pct", "10pct", "100pct")] == [3, 30, 300]
    assert not any("keys" in d for d in subsets.values())  # shards and a rank rule, never a key list
    members = {n: member_keys(ds, SubsetRule.of(d)) for n, d in subsets.items()}
    assert [len(members[n]) for n in ("1pct", "10pct", "100pct")] == [3, 30, 300]
    assert members["1pct"] <= members["10pct"] <= members["100pct"] == set(m["key"])
    info = json.loads((ds / "dataset.json").read_text())
    assert info["schema_version"] == 2 and info["output_format"] == "webdataset" and info["counts"]["success"] == 300
    runs = json.loads((ds / "stats.json").read_text())["builds"]
    assert len(runs) == 2 and runs[0]["images_per_s"] > 0 and runs[1]["downloaded_rows"] == 0
    assert runs[1]["nothing_to_do"] and "nothing_to_do" not in runs[0]
    assert not (ds / "_work").exists()


def test_build_arrow(synth_urls, tmp_path, scheduler):
    ds = tmp_path / "ds"
    build(cfg([synth_urls], ds, format="arrow", shard_size=150, dask_scheduler=scheduler))
    m = pd.read_parquet(ds / "manifest")
    assert sorted(os.listdir(ds / "shards")) == ["00000.parquet", "00000_stats.json", "00001.parquet",
                                                 "00001_stats.json"]  # img2dataset's layout
    tables = {n: pd.read_parquet(ds / "shards" / n) for n in os.listdir(ds / "shards") if n.endswith(".parquet")}
    assert sum(len(t) for t in tables.values()) == (m["status"] == "success").sum() == 300
    row = m.iloc[7]
    shard = tables[f"{row.shard:05d}.parquet"]
    assert shard.iloc[row.offset]["key"] == row.key and shard.iloc[row.offset]["caption"] == row.caption
    assert Image.open(io.BytesIO(shard.iloc[row.offset]["jpg"])).size == (32, 32)
    with pytest.raises(Exception, match="cannot append with --format webdataset"):
        build(cfg([synth_urls], ds, dask_scheduler=scheduler))


def test_faulty_urls_each_end_with_one_status(server, tmp_path, scheduler):
    b = server.base
    rows = [
        (f"{b}/ok/a.jpg", "a good one", "success"),
        (f"{b}/bad/404.jpg", "missing", "http_4xx"),
        (f"{b}/bad/500.jpg", "server error", "http_5xx"),
        (f"{b}/bad/slow.jpg", "slow", "timeout"),
        (f"{b}/bad/redirect.jpg", "redirected", "success"),
        (f"{b}/bad/redirect-file.jpg", "redirect into file://", "redirect_refused"),
        (f"{b}/bad/html.jpg", "html page", "not_image"),
        (f"{b}/bad/truncated.jpg", "cut short", "truncated_image"),
        (f"{b}/bad/bomb.png", "bomb", "image_too_large"),
        (f"{b}/bad/noai.jpg", "opted out", "opt_out"),
        ("file:///etc/passwd", "local file", "invalid_url"),
        ("ftp://127.0.0.1/x.jpg", "ftp", "invalid_url"),
        ("data:image/png;base64,AAAA", "data", "invalid_url"),
        (f"{b}/ok/a.jpg", "same URL again", "duplicate_url"),
        (f"{b}/ok/ünïcödé 1.jpg", "café ☕ naïve Ωmega", "success"),
        (f"{b}/ok/mojibake.jpg", "cafÃ© au lait", "success"),
        (f"{b}/ok/empty.jpg", "", "empty_caption"),
        (f"{b}/ok/long.jpg", "x" * 300, "caption_too_long"),
        ("http://127.0.0.1:9/refused.jpg", "nobody listens", "connection_error"),
        (f"{b}/dup/first.jpg", "same bytes", "success"),
        (f"{b}/dup/second.jpg", "same bytes", "duplicate_image"),
        # one bad row or header never fails its shard (each of these once failed it, on every rerun)
        (f"{b}/bad/redirect-ftp.jpg", "redirect into ftp://", "redirect_refused"),
        (f"{b}/bad/redirect-creds.jpg", "redirect to a URL with credentials", "redirect_refused"),
        ("http://[::1/x.jpg", "an invalid IPv6 literal", "invalid_url"),
        (f"http://user:secret@127.0.0.1:{server.server_address[1]}/ok/c.jpg", "credentials", "invalid_url"),
        ("http://127.0.0.1:99999/x.jpg", "a port out of range", "invalid_url"),
        (f"{b}/bad/retry-after-superscript.jpg", "Retry-After: \u00b2", "rate_limited"),
        (f"{b}/bad/trickle.jpg", "a byte a second", "timeout"),
    ]
    src = tmp_path / "faulty.jsonl"
    src.write_text("\n".join(json.dumps({"url": u, "caption": c}) for u, c, _ in rows) + "\n", encoding="utf-8")
    ds = tmp_path / "ds"
    stats = build(cfg([src], ds, timeout=1.5, request_timeout=3.0, rate_limit_retries=0, max_caption_length=200,
                      shard_size=100, dask_scheduler=scheduler))
    m = pd.read_parquet(ds / "manifest").sort_values("source_row")
    assert m["source_row"].tolist() == list(range(len(rows)))
    assert m["status"].tolist() == [s for _, _, s in rows]
    assert (m.loc[m["status"] != "success", "error"] != "").all()
    assert "--request-timeout" in m.iloc[-1]["error"]  # the trickling host ended at its response's limit
    assert m.iloc[15]["caption"] == "café au lait" and m.iloc[14]["caption"] == "café ☕ naïve Ωmega"
    assert "/ok/ünïcödé 1.jpg" in server.hits
    assert not any("passwd" in p for p in server.hits)
    assert "/ok/x.jpg" not in server.hits and "/ok/c.jpg" not in server.hits  # neither credentialled URL fetched
    assert not m["url"].str.contains("secret").any() and "secret" not in format_stats(stats)  # never stored or shown
    # a duplicate image keeps its bytes in the shard; the manifest and subsets exclude it
    assert set(tar_members(ds)) == set(m.loc[m["status"].isin(["success", "duplicate_image"]), "key"])
    assert stats["failing_shards"] and stats["failing_shards"][0]["failure_rate"] > 0.5


def test_retry_of_shards_whose_every_row_failed_leaves_one_row_per_input(server, tmp_path, scheduler):
    """Every row of the first build's shards fails transiently; the retry downloads them: each key is in the manifest
    once (its earlier shard's file rewritten, empty), and a second retry finds nothing to do."""
    paths = [f"/ok/all-fail-{i}.jpg" for i in range(6)]
    server.flaky.update({p: 1 for p in paths})
    src = tmp_path / "all.csv"
    pd.DataFrame({"url": [server.base + p for p in paths], "caption": [f"c {i}" for i in range(6)]}).to_csv(
        src, index=False)
    ds = tmp_path / "ds"
    build(cfg([src], ds, shard_size=3, rate_limit_retries=0, dask_scheduler=scheduler))
    assert pd.read_parquet(ds / "manifest")["status"].tolist() == ["http_5xx"] * 6
    stats = build(cfg([], ds, retry_failed=True, dask_scheduler=scheduler))
    m = pd.read_parquet(ds / "manifest")
    assert len(m) == 6 and m["key"].is_unique and (m["status"] == "success").all(), m[["key", "status", "shard"]]
    assert stats["counts"] == {"success": 6} and stats["success_rate"] == 1.0
    build(cfg([], ds, retry_failed=True, dask_scheduler=scheduler))  # nothing transient: no shard planned again
    assert len(pd.read_parquet(ds / "manifest")) == 6 and all(server.hits[p] == 2 for p in paths)
    assert len(json.loads((ds / "dataset.json").read_text())["ingests"]) == 2


def test_append_new_lists_and_retry_failed(synth_dir, server, tmp_path, scheduler):
    attrs = pd.read_parquet(synth_dir / "attributes.parquet")
    urls = server.base + "/img/" + attrs["path"]
    pd.DataFrame({"url": urls[:150], "caption": attrs["caption"][:150]}).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame({"url": urls[100:], "caption": attrs["caption"][100:]}).to_parquet(tmp_path / "b.parquet")
    flaky = ["/img/" + p for p in attrs["path"][:10]]
    server.flaky.update({p: 1 for p in flaky})
    ds = tmp_path / "ds"
    build(cfg([tmp_path / "a.csv"], ds, subsets=["0.5"], rate_limit_retries=0, dask_scheduler=scheduler))  # a 503 is not waited for
    m1 = pd.read_parquet(ds / "manifest")
    assert (m1["status"] == "http_5xx").sum() == 10 and (m1["status"] == "success").sum() == 140
    first_shards = {n: os.path.getmtime(ds / "shards" / n) for n in os.listdir(ds / "shards")}
    build(cfg([tmp_path / "b.parquet"], ds, dask_scheduler=scheduler))
    m2 = pd.read_parquet(ds / "manifest")
    assert len(m2) == 350 and m2["key"].is_unique
    assert (m2["status"] == "duplicate_url").sum() == 50 and (m2["status"] == "success").sum() == 290
    assert m2.loc[m2["ingest"] == 1, "shard"].dropna().min() > max(int(n[:5]) for n in first_shards)
    assert all(os.path.getmtime(ds / "shards" / n) == t for n, t in first_shards.items())
    assert json.loads((ds / "subsets" / "50pct.json").read_text())["count"] == 145  # kept up to date
    # written as before manifest/ existed (one manifest.parquet): the next build rewrites it in the new layout
    import shutil

    shutil.rmtree(ds / "manifest")
    m2.to_parquet(ds / "manifest.parquet")
    ingest0 = ds / "_state" / "ingests" / "00000"  # and its first ingest one plan.parquet, no shard input files
    shard_inputs = {p.name: feather.read_table(p) for p in (ingest0 / "shards").iterdir()}
    Layout(str(ds)).load_plan(0).to_parquet(ingest0 / "plan.parquet")
    shutil.rmtree(ingest0 / "shards")
    (ingest0 / "shards.json").unlink()
    shutil.rmtree(ingest0 / "unsharded")
    shutil.rmtree(ingest0 / "keys")
    build(cfg([], ds, retry_failed=True, dask_scheduler=scheduler))
    assert not (ds / "manifest.parquet").exists()
    assert any(n.startswith("ingest-00001-") for n in os.listdir(ds / "manifest"))
    assert {p.name: feather.read_table(p) for p in (ingest0 / "shards").iterdir()} == shard_inputs
    m3 = pd.read_parquet(ds / "manifest")
    assert len(m3) == 350 and (m3["status"] == "success").sum() == 300
    # the retry is an ingest planned by Dask tasks over the manifest's files: its shards hold the 10 rows, and
    # replaced/ names them with the shards the earlier plan had put them in
    retry = ds / "_state" / "ingests" / "00002"
    assert json.loads((retry / "inputs.json").read_text())["kind"] == "retry"
    assert sum(json.loads((retry / "shards.json").read_text()).values()) == 10
    failed = m1[m1["status"] == "http_5xx"]
    assert sorted(os.listdir(retry / "replaced")) == sorted(  # named after the manifest file each came from
        f"shard-{int(s):05d}.parquet" for s in set(failed["shard"]))
    replaced = pd.read_parquet(retry / "replaced").sort_values("key")
    assert replaced["key"].tolist() == sorted(failed["key"])
    assert replaced["shard"].tolist() == failed.sort_values("key")["shard"].astype(int).tolist()
    assert (m3.set_index("key").loc[failed["key"], "ingest"] == 2).all()
    # replaced/ files numbered as retries named them before (any shard's rows): the same manifest again
    for i, name in enumerate(sorted(os.listdir(retry / "replaced"))):
        os.rename(retry / "replaced" / name, retry / "replaced" / f"{i:05d}.parquet")
    build(cfg([], ds, retry_failed=True, dask_scheduler=scheduler))  # nothing transient is left: a finalize only
    pd.testing.assert_frame_equal(pd.read_parquet(ds / "manifest"), m3)
    assert all(server.hits[p] == 2 for p in flaky)
    assert all(n == 1 for p, n in server.hits.items() if p.startswith("/img/") and p not in flaky)
    assert set(tar_members(ds)) == set(m3.loc[m3["status"] == "success", "key"])
    # a new list with URLs of the old-layout ingest: its URL keys are bucketed into a key store once, and found
    pd.DataFrame({"url": urls[:5], "caption": attrs["caption"][:5]}).to_csv(tmp_path / "c.csv", index=False)
    build(cfg([tmp_path / "c.csv"], ds, dask_scheduler=scheduler))
    m4 = pd.read_parquet(ds / "manifest")
    assert len(m4) == 355 and (m4.loc[m4["ingest"] == 3, "status"] == "duplicate_url").all()
    assert os.listdir(ingest0 / "keys")


def test_txt_rows_are_empty_caption_and_empty_lists_warn(server, tmp_path, capsys, scheduler):
    (tmp_path / "u.txt").write_text(f"{server.base}/ok/a.jpg\n{server.base}/ok/b.jpg\n")
    (tmp_path / "header.csv").write_text("url,caption\n")
    (tmp_path / "one.csv").write_text(f"url,caption\n{server.base}/ok/c.jpg,a good one\n")
    build(cfg([tmp_path / "u.txt", tmp_path / "header.csv", tmp_path / "one.csv"], tmp_path / "ds", dask_scheduler=scheduler))
    m = pd.read_parquet(tmp_path / "ds" / "manifest").sort_values(["source", "source_row"])
    assert m["status"].tolist() == ["success", "empty_caption", "empty_caption"]  # one.csv, then u.txt
    err = capsys.readouterr().err
    assert "header.csv: no rows (an empty or header-only list)" in err
    assert "u.txt: a .txt list has no captions, so its 2 rows get the empty_caption status" in err
    assert not any(p.endswith(("/a.jpg", "/b.jpg")) for p in server.hits)  # never downloaded


def test_progress_counts_rows_while_one_shard_downloads(synth_urls, server, tmp_path, capsys, scheduler):
    """One 300-row shard: a shard-counting bar would sit at 0/1 until the end; the row bar moves."""
    import re

    server.delay_s = 0.02
    build(cfg([synth_urls], tmp_path / "ds", shard_size=300, thread_count=2, progress=True, dask_scheduler=scheduler))
    err = capsys.readouterr().err
    counts = {int(m) for m in re.findall(r"\| *(\d+)/300 ", err)}
    assert 300 in counts and any(0 < c < 300 for c in counts), err[-2000:]


def test_odd_rows_end_with_their_own_status_and_the_build_goes_on(server, tmp_path, scheduler):
    """A URL holding a lone surrogate (a JSON "\\ud800" escape) failed the whole build; an object as the URL and a
    caption with a lone surrogate were tracebacks. Each row now ends with its own status, the rest download."""
    from psdclip.pipeline.reader import load_manifest

    ok = [json.dumps({"url": f"{server.base}/ok/{k}.jpg", "caption": f"fine {k}"}) for k in range(3)]
    odd = ['{"url": "' + server.base + '/ok/\\ud800.jpg", "caption": "surrogate url"}',
           '{"url": "' + server.base + '/ok/5.jpg", "caption": "surrogate \\udfff caption"}',
           json.dumps({"url": {"href": f"{server.base}/ok/6.jpg"}, "caption": "object url"})]
    (tmp_path / "odd.jsonl").write_text("\n".join(ok + odd) + "\n")
    build(cfg([tmp_path / "odd.jsonl"], tmp_path / "ds", dask_scheduler=scheduler))
    m = load_manifest(str(tmp_path / "ds")).set_index("caption")
    assert (m.loc[[f"fine {k}" for k in range(3)], "status"] == "success").all()
    assert m.loc["surrogate url", "status"] == "invalid_url" and "not valid UTF-8" in m.loc["surrogate url", "error"]
    assert m.loc["surrogate ? caption", "status"] == "success"
    assert m.loc["object url", "status"] in ("invalid_url", "empty_url")


def test_a_damaged_manifest_file_is_one_line_and_the_builds_rerun_repairs_it(dataset_dir, tmp_path):
    """Training on a dataset whose manifest file is cut short is one line naming it and the command that repairs it
    (it was a traceback), and that command, the same `data build` run again, writes the manifest again."""
    import shutil

    from helpers.cli import cli

    ds = tmp_path / "ds"
    shutil.copytree(dataset_dir, ds, symlinks=True)
    urls = dataset_dir.parent / "urls.csv"  # the list the dataset was built from
    victim = sorted((ds / "manifest").glob("shard-*.parquet"))[0]
    whole = victim.read_bytes()
    victim.write_bytes(whole[: len(whole) // 2])
    train = ["train", "--data", ds, "--out", tmp_path / "run", "--steps", 2, "--batch-size", 16, "--workers", 1,
             "--no-progress", "--model", "rn-small"]
    r = cli(*train, check=False)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("psdclip: error")]
    assert r.returncode == 2 and len(errors) == 1 and victim.name in errors[0] and "data build" in errors[0], \
        r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    build(cfg([urls], ds, image_size=64, shard_size=100, subsets=["0.1", "1.0"]))
    assert victim.read_bytes() != whole[: len(whole) // 2]
    assert cli(*train).returncode == 0
