"""Polite downloading: per-host rate cap, back-off on 429/503 honouring Retry-After, and the per-shard time limit,
first on the fetch function against a real server, then through a real build (Dask + img2dataset)."""
import email.utils
import json
import time

import pandas as pd
import pytest

from helpers.datasets import cfg, tar_members

from psdclip.pipeline.build import build
from psdclip.pipeline.stats import format_stats
from psdclip.pipeline.download import classify
from psdclip.pipeline.polite import HostLimiter, ShardPolicy, fetch, retry_after_seconds


def test_retry_after_forms():
    assert retry_after_seconds("7") == 7.0
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= retry_after_seconds(date) <= 31
    assert retry_after_seconds(email.utils.formatdate(time.time() - 30, usegmt=True)) == 0.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None
    # host-controlled values that once crashed a shard: '²'.isdigit() is True but float('²') raises
    assert retry_after_seconds("\u00b2") is None and retry_after_seconds("\u0663") is None
    assert retry_after_seconds("Fri, 31 Dec 99999 23:59:59 GMT") is None


def test_host_limiter_spaces_starts_and_honours_pauses():
    lim, far = HostLimiter(), time.monotonic() + 100
    waits = [lim.reserve("a", 0.5, far) for _ in range(3)]
    assert waits[0] == pytest.approx(0, abs=0.01) and waits[1] == pytest.approx(0.5, abs=0.01)
    assert waits[2] == pytest.approx(1.0, abs=0.01)
    assert lim.reserve("b", 0.5, far) == pytest.approx(0, abs=0.01)  # per host
    lim.pause("b", time.monotonic() + 5)
    assert lim.reserve("b", 0.0, far) == pytest.approx(5, abs=0.05)
    assert lim.reserve("b", 0.0, time.monotonic() + 1) is None  # would start after the deadline


def _policy(**kw):
    return ShardPolicy.starting_now(kw.pop("timeout", 5.0), kw.pop("shard_timeout", 30.0), **kw)


def test_fetch_waits_for_retry_after_then_succeeds(server):
    url = f"{server.base}/throttle/a.jpg"
    key, stream, err = fetch((0, url), _policy(), retries=0, limiter=HostLimiter())
    assert err is None and stream.read(2) == b"\xff\xd8"
    first, second = server.times["/throttle/a.jpg"]
    assert second - first >= 0.95  # Retry-After: 1 honoured


def test_fetch_gives_up_on_a_host_that_keeps_refusing(server):
    lim = HostLimiter()
    _, stream, err = fetch((0, f"{server.base}/limited/a.jpg"), _policy(throttle_retries=2, backoff=0.1),
                           retries=0, limiter=lim)
    assert stream is None and classify("download", err) == "rate_limited"
    assert server.hits["/limited/a.jpg"] == 3
    # a Retry-After longer than --max-backoff is not waited for, and the host stays paused for the others
    server.retry_after = "120"
    t = time.monotonic()
    _, _, err = fetch((1, f"{server.base}/limited/b.jpg"), _policy(max_backoff=5), retries=0, limiter=lim)
    assert "exceeds --max-backoff" in err and classify("download", err) == "rate_limited"
    _, _, err = fetch((2, f"{server.base}/ok/c.jpg"), _policy(max_backoff=5), retries=0, limiter=lim)
    assert classify("download", err) == "rate_limited" and "/ok/c.jpg" not in server.hits
    assert time.monotonic() - t < 3


def test_fetch_stops_a_trickling_host_at_the_shard_deadline(server):
    t = time.monotonic()
    _, stream, err = fetch((0, f"{server.base}/stuck/a.jpg"), _policy(timeout=5.0, shard_timeout=2.0), retries=3,
                           limiter=HostLimiter())
    assert stream is None and 1.9 <= time.monotonic() - t < 4
    assert classify("download", err) == "timeout" and "--shard-timeout" in err


def test_fetch_bounds_one_response_and_checks_every_redirect_hop(server):
    t = time.monotonic()
    _, stream, err = fetch((0, f"{server.base}/bad/trickle.jpg"), _policy(timeout=5.0, shard_timeout=60.0,
                                                                          request_timeout=2.0), retries=0,
                           limiter=HostLimiter())
    assert stream is None and classify("download", err) == "timeout" and "--request-timeout" in err
    assert time.monotonic() - t < 20  # the whole response trickles for 30 s
    for path in ("/bad/redirect-ftp.jpg", "/bad/redirect-creds.jpg", "/bad/redirect-file.jpg"):
        _, stream, err = fetch((0, server.base + path), _policy(), retries=0, limiter=HostLimiter())
        assert stream is None and classify("download", err) == "redirect_refused", (path, err)
        assert "pw" not in err
    _, stream, err = fetch((0, "http://[::1/x.jpg"), _policy(), retries=0, limiter=HostLimiter())
    assert stream is None and "Invalid IPv6" in err


def test_build_is_polite_ends_in_time_and_retry_failed_completes(server, tmp_path, scheduler):
    """Under a per-host cap, with a host that asks for Retry-After and one that never finishes a response: the
    build ends within its shard time limit, every row has one status, and --retry-failed completes it."""
    port = server.server_address[1]
    capped = [(f"http://localhost:{port}/ok/c{i}.jpg", f"capped {i}") for i in range(24)]
    rows = capped + [(f"{server.base}/throttle/t{i}.jpg", f"throttled {i}") for i in range(3)] + \
        [(f"{server.base}/limited/l{i}.jpg", f"limited {i}") for i in range(2)] + \
        [(f"{server.base}/stuck/s{i}.jpg", f"stuck {i}") for i in range(2)]
    src = tmp_path / "urls.jsonl"
    src.write_text("\n".join(json.dumps({"url": u, "caption": c}) for u, c in rows) + "\n")
    ds = tmp_path / "ds"
    limit, rate = 6.0, 8.0
    stats = build(cfg([src], ds, shard_size=16, timeout=10.0, shard_timeout=limit, host_rate=rate,
                      rate_limit_retries=1, dask_scheduler=scheduler))
    # a stuck response alone trickles for 30 s; the shards end at their limit (plus a worker's start-up)
    assert stats["build"]["download_s"] < 25
    starts = sorted(t for ts in server.times.values() for t in ts)
    assert starts[-1] - starts[0] < limit
    m = pd.read_parquet(ds / "manifest").sort_values("source_row")
    assert len(m) == len(rows) and m["key"].is_unique
    status = dict(zip(m["caption"], m["status"]))
    assert all(status[c] == "success" for _, c in capped[:3])
    assert all(status[f"throttled {i}"] == "success" for i in range(3))
    assert all(status[f"limited {i}"] == "rate_limited" for i in range(2))
    assert all(status[f"stuck {i}"] == "timeout" for i in range(2))
    # the cap holds over the whole build (both workers): at most rate + one per worker in any one second
    starts = sorted(t for p, ts in server.times.items() if p.startswith("/ok/c") for t in ts)
    assert len(starts) == len(capped)
    assert max(sum(1 for u in starts if s <= u < s + 1.0) for s in starts) <= rate + 2
    # a Retry-After: 1 was waited for before the throttled URL was asked again
    throttled = [ts for p, ts in server.times.items() if p.startswith("/throttle/")]
    assert len(throttled) == 3 and all(len(ts) == 2 and ts[1] - ts[0] >= 0.95 for ts in throttled)
    assert all(server.hits[f"/limited/l{i}.jpg"] == 2 for i in range(2))
    # the per-host figures name the failing host and its statuses
    top = {h["host"]: h for h in stats["hosts"]}
    faulty = top[f"127.0.0.1:{port}"]
    assert faulty["attempted"] == 7 and faulty["failed"] == 4
    assert faulty["statuses"] == {"rate_limited": 2, "timeout": 2} and f"localhost:{port}" not in top
    assert f"127.0.0.1:{port}" in format_stats(stats).split("failing hosts")[1]

    server.limited = server.stuck = False
    build(cfg([], ds, retry_failed=True, shard_timeout=limit, dask_scheduler=scheduler))
    m = pd.read_parquet(ds / "manifest")
    assert len(m) == len(rows) and (m["status"] == "success").sum() == len(rows)
    assert set(tar_members(ds)) == set(m["key"])


def test_robots_txt_is_read_once_per_host_and_honoured_and_the_agent_names_psdclip(server, tmp_path, scheduler):
    """robots.txt (RFC 9309): rules for "psdclip" and for the operator's --user-agent-token are honoured (rows end
    robots_disallowed), a host whose robots.txt answers 5xx is treated as disallowed (robots_unreachable,
    transient: --retry-failed asks again), a 404 allows all; each worker reads a host's robots.txt once per
    build; every request carries an identifiable User-Agent; --ignore-robots-txt opts out."""
    port = server.server_address[1]
    server.robots["127.0.0.1"] = (200, "User-agent: psdclip\nDisallow: /ok/private\n\n"
                                       "User-agent: mytoken\nDisallow: /ok/token\n\nUser-agent: *\nDisallow: /ok/pub9\n")
    server.robots["localhost"] = (503, "down")
    rows = [(f"{server.base}/ok/pub{i}.jpg", f"public {i}") for i in range(4)] + \
        [(f"{server.base}/ok/private{i}.jpg", f"private {i}") for i in range(3)] + \
        [(f"{server.base}/ok/token{i}.jpg", f"token {i}") for i in range(2)] + \
        [(f"http://localhost:{port}/ok/down{i}.jpg", f"down {i}") for i in range(2)]
    src = tmp_path / "urls.jsonl"
    src.write_text("\n".join(json.dumps({"url": u, "caption": c}) for u, c in rows) + "\n")
    ds = tmp_path / "ds"
    build(cfg([src], ds, shard_size=4, user_agent_token="mytoken", dask_scheduler=scheduler))
    status = dict(zip(*[pd.read_parquet(ds / "manifest")[c] for c in ("caption", "status")]))
    assert [status[f"public {i}"] for i in range(4)] == ["success"] * 4
    assert [status[f"private {i}"] for i in range(3)] == ["robots_disallowed"] * 3
    assert [status[f"token {i}"] for i in range(2)] == ["robots_disallowed"] * 2
    assert [status[f"down {i}"] for i in range(2)] == ["robots_unreachable"] * 2
    assert not any(p.startswith(("/ok/private", "/ok/token", "/ok/down")) for p in server.hits)
    assert 1 <= server.hits["/robots.txt"] <= 2 * 2  # once per host per worker process (2 workers, 2 host names)
    image_agents = {a for a in server.agents if a}
    assert image_agents and all(a.startswith("psdclip/") and "mytoken" in a for a in image_agents)
    assert classify("download", "robots.txt disallows this URL for psdclip") == "robots_disallowed"

    server.robots["localhost"] = (404, "")  # the host is back, without rules: a retry (a new build) reads it again
    build(cfg([], ds, retry_failed=True, dask_scheduler=scheduler))
    status = dict(zip(*[pd.read_parquet(ds / "manifest")[c] for c in ("caption", "status")]))
    assert [status[f"down {i}"] for i in range(2)] == ["success"] * 2
    assert [status[f"private {i}"] for i in range(3)] == ["robots_disallowed"] * 3  # not transient

    fetched = server.hits["/robots.txt"]
    build(cfg([src], tmp_path / "ignored", shard_size=4, ignore_robots_txt=True, user_agent="my-crawler/1.0",
              dask_scheduler=scheduler))
    m = pd.read_parquet(tmp_path / "ignored" / "manifest")
    assert (m["status"] == "success").all() and server.hits["/robots.txt"] == fetched
    assert server.agents["my-crawler/1.0"] == len(rows)


def test_a_body_past_max_image_bytes_is_not_read_on(server, tmp_path, scheduler):
    """--max-image-bytes: a response whose body grows past it (no Content-Length) or that says it will (an 800 MB
    Content-Length) ends its row image_too_large, streamed and cut, never read whole; the other rows succeed."""
    from psdclip.pipeline.reader import load_manifest

    urls = tmp_path / "u.csv"
    pd.DataFrame({"url": [server.base + p for p in ("/ok/a.jpg", "/bad/huge.jpg", "/bad/huge-said.jpg")],
                  "caption": ["fine", "endless", "said big"]}).to_csv(urls, index=False)
    build(cfg([urls], tmp_path / "ds", max_image_bytes=1_000_000, dask_scheduler=scheduler))
    m = load_manifest(str(tmp_path / "ds")).set_index("caption")
    assert m.loc["fine", "status"] == "success"
    for caption in ("endless", "said big"):
        assert m.loc[caption, "status"] == "image_too_large", m.loc[caption, "error"]
        assert "--max-image-bytes 1,000,000" in m.loc[caption, "error"]
    assert server.hits["huge sent whole"] == 0  # the 64 MB body was never read to its end
