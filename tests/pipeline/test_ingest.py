"""The partitioned ingest (Dask tasks on the shared real cluster) against an in-memory reference of the same rules."""
import itertools
import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers.datasets import cfg

from psdclip.pipeline import parts as parts_mod
from psdclip.pipeline.clean import clean_partition
from psdclip.pipeline.dataset import Layout
from psdclip.core.errors import InputError
from psdclip.pipeline.ingest import ingest_inputs
from psdclip.pipeline.parts import split_file
from psdclip.pipeline.keys import row_keys
from psdclip.pipeline.read import read_url_list


def reference(paths, earlier=frozenset()):
    """One process, every row at once: keep the first pending occurrence of a URL (input order: file, row) unless an
    earlier ingest took it; keys: the URL key of a kept row, a hash of (file, row) for every other."""
    out, seen = [], set(earlier)
    for path in paths:
        df = clean_partition(read_url_list(str(path)), 200)
        for row, status, ukey in zip(df["source_row"], df["status"].astype(str), df["ukey"].astype(str)):
            if status == "pending" and ukey not in seen:
                seen.add(ukey)
                out.append((str(path), int(row), ukey, "pending"))
            else:
                st = "duplicate_url" if status == "pending" else status
                out.append((str(path), int(row), row_keys([str(path)], [row])[0], st))
    return pd.DataFrame(out, columns=["source", "source_row", "key", "status"])


def url_list(rng, n, hosts, dup_pool):
    urls = [f"http://{hosts[h]}/{rng.integers(dup_pool)}.jpg" for h in rng.integers(len(hosts), size=n)]
    caps = [f"caption {i}" if i % 17 else "" for i in range(n)]  # some empty captions (filtered)
    urls = [u if i % 23 else "file:///etc/passwd" for i, u in enumerate(urls)]  # some refused URLs
    return pd.DataFrame({"url": urls, "caption": caps})


def plan_of(layout, ingest):
    return layout.load_plan(ingest).sort_values(["source", "source_row"]).reset_index(drop=True)


def test_partitioned_ingest_gives_the_reference_keys_and_statuses(tmp_path, scheduler, monkeypatch):
    from dask.distributed import Client

    rng = np.random.default_rng(0)
    hosts = ["big.test"] * 6 + [f"h{i}.test" for i in range(40)]  # one host with ~1/8 of the rows
    a, b, c = (url_list(rng, n, hosts, 40) for n in (700, 500, 600))
    a.to_csv(tmp_path / "a.csv", index=False)
    b.to_parquet(tmp_path / "b.parquet")
    c.to_json(tmp_path / "c.jsonl", orient="records", lines=True)
    monkeypatch.setattr(parts_mod, "SPLIT_BYTES", 1000)  # the client cuts the text lists into parts
    monkeypatch.setattr(parts_mod, "PART_BYTES", 8000)
    layout = Layout(str(tmp_path / "ds"))
    layout.create()
    with Client(scheduler) as client:
        first = ingest_inputs(client, layout, cfg([tmp_path / "a.csv", tmp_path / "b.parquet"], layout.root,
                                                  shard_size=60))
        again = ingest_inputs(client, layout, cfg([tmp_path / "b.parquet"], layout.root, shard_size=60))
        ingest_inputs(client, layout, cfg([tmp_path / "c.jsonl"], layout.root, shard_size=60))
    assert again is None  # the same bytes are not ingested twice
    want = reference([tmp_path / "a.csv", tmp_path / "b.parquet"])
    got = plan_of(layout, 0)
    assert len(got) == 1200 and first["rows"] == 1200
    assert got["key"].is_unique
    merged = got.merge(want, on=["source", "source_row"], suffixes=("", "_ref"))
    assert len(merged) == 1200
    assert (merged["key"] == merged["key_ref"]).all() and (merged["status"] == merged["status_ref"]).all()
    assert {"duplicate_url", "empty_caption", "invalid_url", "pending"} <= set(got["status"])
    # the second ingest: duplicates against the first one's key store
    taken = set(want.loc[want["status"] == "pending", "key"])
    want2 = reference([tmp_path / "c.jsonl"], earlier=taken)
    got2 = plan_of(layout, 1).merge(want2, on=["source", "source_row"], suffixes=("", "_ref"))
    assert len(got2) == 600 and (got2["key"] == got2["key_ref"]).all() and (got2["status"] == got2["status_ref"]).all()
    assert (got2["status"] == "duplicate_url").sum() > 100  # most of its URLs were in the first ingest
    # shards: every kept row in exactly one, sizes differ by at most one, numbered after the first ingest's
    pending = got[got["status"] == "pending"]
    sizes = pending.groupby("shard").size()
    assert sizes.sum() == first["pending"] and sizes.max() - sizes.min() <= 1 and sizes.max() <= 60
    assert plan_of(layout, 1).query("shard >= 0")["shard"].min() == sizes.index.max() + 1
    shards = json.load(open(os.path.join(layout.ingests, "00000", "shards.json")))
    assert {int(k): v for k, v in shards.items()} == sizes.to_dict()
    # hosts: the big host's rows spread over the shards (each bucket deals its rows to consecutive shards)
    big = pending[pending["host"] == "big.test"].groupby("shard").size().reindex(sizes.index, fill_value=0)
    n_shards, buckets = len(sizes), json.load(open(os.path.join(layout.ingests, "00000", "inputs.json")))["buckets"]
    assert big.max() <= -(-big.sum() // n_shards) + buckets
    for _, part in pending.sort_values("order").groupby("shard"):
        # interleaved by round (each host's first row, then second, ...): a host repeats only where it alone is
        # left (its count beyond the next host's) or across the end of one round and the start of the next
        run = max(len(list(g)) for _, g in itertools.groupby(part["host"]))
        counts = part["host"].value_counts().tolist() + [0]
        assert run <= counts[0] - counts[1] + 2


def test_text_lists_cut_into_parts_read_as_the_whole(tmp_path, scheduler, monkeypatch):
    """csv with quoted newlines (a cut inside a quoted field falls back to one task), tsv, txt, jsonl and Parquet row
    groups: the rows and their numbers are those of the file read whole."""
    from dask.distributed import Client

    rng = np.random.default_rng(1)
    df = url_list(rng, 400, [f"h{i}.test" for i in range(9)], 10**9)
    df.loc[::7, "caption"] = 'a "quoted",\nmulti-line caption'
    files = {"q.csv": lambda p: df.to_csv(p, index=False), "t.tsv": lambda p: df.to_csv(p, sep="\t", index=False),
             "u.txt": lambda p: open(p, "w").write("\n".join(df["url"]) + "\n"),
             "j.jsonl": lambda p: df.to_json(p, orient="records", lines=True),
             "r.parquet": lambda p: pq.write_table(pa.Table.from_pandas(df), p, row_group_size=50)}
    paths = []
    for name, write in files.items():
        write(tmp_path / name)
        paths.append(tmp_path / name)
    monkeypatch.setattr(parts_mod, "SPLIT_BYTES", 1000)
    monkeypatch.setattr(parts_mod, "PART_BYTES", 3000)
    for p in paths:
        size = os.path.getsize(p)
        assert len(split_file(str(p), p.suffix[1:], size, 2)) > 2, p  # really cut
    layout = Layout(str(tmp_path / "ds"))
    layout.create()
    with Client(scheduler) as client:
        ingest_inputs(client, layout, cfg(paths, layout.root, shard_size=1000))
    got = plan_of(layout, 0)
    want = reference(paths)
    merged = got.merge(want, on=["source", "source_row"], suffixes=("", "_ref"))
    assert len(got) == len(want) == 5 * 400 - 0 and len(merged) == len(want)
    assert (merged["key"] == merged["key_ref"]).all() and (merged["status"] == merged["status_ref"]).all()
    assert got.loc[(got["source"] == str(tmp_path / "q.csv")) & (got["source_row"] == 7), "caption"].item() \
        == 'a "quoted", multi-line caption'


def test_bad_line_in_a_cut_file_names_the_files_line(tmp_path, scheduler, monkeypatch):
    from dask.distributed import Client

    lines = [json.dumps({"url": f"http://a.test/{i}", "caption": "c"}) for i in range(300)]
    lines[250] = '{"url": "http://a.test/x", "caption": '  # line 251, in a later part
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(parts_mod, "SPLIT_BYTES", 1000)
    monkeypatch.setattr(parts_mod, "PART_BYTES", 3000)
    layout = Layout(str(tmp_path / "ds"))
    layout.create()
    with Client(scheduler) as client, pytest.raises(InputError, match=r"bad.jsonl:251: malformed JSON line"):
        ingest_inputs(client, layout, cfg([tmp_path / "bad.jsonl"], layout.root))
    assert layout.ingest_ids() == []  # nothing half-written
