"""psdclip data score and score subsets (issue 28.1-2): every success scored as the model's image-caption cosine,
per shard, resumable, reusable from an index's embeddings; subsets by threshold or top fraction, nested in a size
subset, read by the trainer from each shard's score file."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from helpers.cli import cli

from psdclip.pipeline.subsets import SubsetRule, member_keys


@pytest.fixture()
def ds(dataset_dir, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(dataset_dir, out)  # (the shared dataset is left as it is)
    return out


def test_scores_per_shard_and_score_subsets(ds, runs, tmp_path):
    r = cli("data", "score", ds, "--checkpoint", runs[0], "--name", "clip0", "--workers", 0, "--no-progress")
    assert "scores clip0" in r.stdout
    folder = ds / "scores" / "clip0"
    files = sorted(folder.glob("shard-*.parquet"))
    scores = pd.concat([pd.read_parquet(f) for f in files])
    m = pd.read_parquet(ds / "manifest")
    ok = m[m["status"] == "success"]
    assert set(scores["key"]) == set(ok["key"]) and scores["key"].is_unique  # every success, once
    assert len(files) == ok["shard"].nunique()
    assert ((scores["clip_score"] >= -1.0001) & (scores["clip_score"] <= 1.0001)).all()
    # a score is the cosine of the image and caption embeddings the model gives that sample
    parts = folder / "embeddings"
    img = np.load(parts / "img_emb" / "img_emb_00000.npy")
    txt = np.load(parts / "text_emb" / "text_emb_00000.npy")
    first = pd.read_parquet(folder / "shard-00000.parquet")
    assert np.allclose(first["clip_score"], (img * txt).sum(1), atol=1e-5)
    from psdclip.train.loading import load_model

    loaded = load_model(str(runs[0]), torch.device("cpu"))
    row = ok[ok["key"] == first["key"].iloc[0]].iloc[0]
    with torch.no_grad():
        t = loaded.model.encode_text(loaded.tokenizer([row["caption"]]), normalize=True)[0].numpy()
    assert np.allclose(t, txt[0], atol=1e-4)
    # a rerun writes nothing; a run from an index's embeddings (same checkpoint) gives the same files
    assert "(0 written now)" in cli("data", "score", ds, "--checkpoint", runs[0], "--name", "clip0", "--workers", 0,
                                    "--no-progress").stdout
    cli("index", "build", "--checkpoint", runs[0], "--data", ds, "--out", tmp_path / "idx", "--workers", 0,
        "--no-progress")
    cli("data", "score", ds, "--checkpoint", runs[0], "--name", "from-index", "--embeddings",
        tmp_path / "idx" / "embeddings")
    again = pd.concat([pd.read_parquet(f) for f in sorted((ds / "scores" / "from-index").glob("shard-*.parquet"))])
    assert np.allclose(again.set_index("key")["clip_score"].sort_index(),
                       scores.set_index("key")["clip_score"].sort_index(), atol=1e-6)
    assert not (ds / "scores" / "from-index" / "embeddings").exists()  # nothing encoded again
    # another checkpoint under the same name is refused; another checkpoint's index embeddings too
    r = cli("data", "score", ds, "--checkpoint", runs[1], "--name", "clip0", check=False)
    assert r.returncode == 2 and "scores made from another checkpoint" in r.stderr
    r = cli("data", "score", ds, "--checkpoint", runs[1], "--name", "other", "--embeddings",
            tmp_path / "idx" / "embeddings", check=False)
    assert r.returncode == 2 and "made from another checkpoint" in r.stderr

    # the top 30%: a threshold found from a histogram; members exactly the samples at or above it
    r = cli("data", "subset", ds, "--name", "top30", "--score", "clip0", "--top-fraction", "0.3")
    doc = json.load(open(ds / "subsets" / "top30.json"))
    t = doc["score"]["min"]
    want = set(scores.loc[scores["clip_score"] >= t, "key"])
    assert abs(len(want) - 0.3 * len(scores)) <= 3 and doc["count"] == len(want)
    assert member_keys(str(ds), SubsetRule.of(doc, str(ds))) == want
    assert doc["score"]["range"][0] >= t
    stats = cli("data", "stats", ds).stdout
    assert "top30" in stats and f"clip_score >= {t:.4f}" in stats
    assert json.loads(cli("data", "stats", ds, "--json").stdout)["subsets"]["top30"]["count"] == doc["count"]
    # nested: a score threshold inside the 10% size subset
    cli("data", "subset", ds, "--name", "top50-of-10pct", "--score", "clip0", "--top-fraction", "0.5",
        "--within", "10pct")
    inner = json.load(open(ds / "subsets" / "top50-of-10pct.json"))
    ten = member_keys(str(ds), SubsetRule.of(json.load(open(ds / "subsets" / "10pct.json"))))
    got = member_keys(str(ds), SubsetRule.of(inner, str(ds)))
    assert got <= ten and abs(len(got) - len(ten) / 2) <= 2
    # the trainer reads it like any subset: only its samples
    run = tmp_path / "run"
    cli("train", "--data", ds / "subsets" / "top30.json", "--out", run, "--model", "rn-small", "--batch-size", 16,
        "--steps", 2, "--workers", 0, "--no-progress")
    from psdclip.train.data import ShardStream

    stream = ShardStream(str(ds / "subsets" / "top30.json"), 8, lambda im: torch.zeros(3, 4, 4),
                         lambda texts: torch.zeros(len(texts), 4, dtype=torch.long), shuffle_buffer=10)
    seen = set()
    for batch in stream:
        seen.update(batch["keys"])
        if len(seen) >= len(want):
            break
    assert seen == want
    # refusals in one line
    r = cli("data", "subset", ds, "--name", "top30", "--score", "clip0", "--min-score", "0.5", check=False)
    assert r.returncode == 2 and "exists" in r.stderr
    r = cli("data", "subset", ds, "--name", "none", "--score", "clip0", "--min-score", "1.5", check=False)
    assert r.returncode == 2 and "would be empty" in r.stderr
    r = cli("data", "subset", ds, "--name", "x", "--score", "nothing", "--min-score", "0", check=False)
    assert r.returncode == 2 and "no such scores" in r.stderr


def test_near_duplicate_column_is_the_exact_nearest_other_image(ds, runs):
    cli("data", "score", ds, "--checkpoint", runs[0], "--name", "nn", "--near-duplicates", "--workers", 0,
        "--no-progress")
    folder = ds / "scores" / "nn"
    parts = folder / "embeddings"
    names = sorted(p.name[len("img_emb_"):-4] for p in (parts / "img_emb").glob("img_emb_*.npy"))
    img = np.concatenate([np.load(parts / "img_emb" / f"img_emb_{n}.npy").astype(np.float32) for n in names])
    keys = np.concatenate([pd.read_parquet(parts / "metadata" / f"metadata_{n}.parquet")["key"].to_numpy()
                           for n in names])
    sims = img @ img.T
    np.fill_diagonal(sims, -np.inf)  # brute force over the whole dataset at once
    scores = pd.concat([pd.read_parquet(folder / f"shard-{int(n):05d}.parquet") for n in names])
    assert list(scores["key"]) == list(keys) and len(names) > 1  # (several parts: the search crosses shards)
    assert np.allclose(scores["nn_similarity"], sims.max(1), atol=1e-5)
    pos = {k: i for i, k in enumerate(keys)}
    picked = sims[np.arange(len(keys)), [pos[k] for k in scores["nn_key"]]]
    assert np.allclose(picked, sims.max(1), atol=1e-5) and (scores["nn_key"] != scores["key"]).all()
    assert {"key", "clip_score", "nn_similarity", "nn_key"} == set(scores.columns)
    again = cli("data", "score", ds, "--checkpoint", runs[0], "--name", "nn", "--near-duplicates", "--workers", 0,
                "--no-progress")
    assert "0 searched for near duplicates" in again.stdout
    # a dedupe subset: --max-score on nn_similarity keeps exactly the samples at or below it, and the trainer's
    # reader takes exactly those
    cut = float(np.quantile(scores["nn_similarity"], 0.6))
    out = cli("data", "subset", ds, "--name", "dedup", "--score", "nn", "--column", "nn_similarity",
              "--max-score", cut).stdout
    assert "nn_similarity <= " in out
    doc = json.loads((ds / "subsets" / "dedup.json").read_text())
    want = set(scores.loc[scores["nn_similarity"] <= cut, "key"])
    assert doc["count"] == len(want) and doc["score"]["max"] == cut and doc["score"]["min"] is None
    assert doc["score"]["range"][1] <= cut
    assert member_keys(str(ds), SubsetRule.of(doc, str(ds))) == want
    assert "nn_similarity <= " in cli("data", "stats", ds).stdout
    r = cli("data", "subset", ds, "--name", "d2", "--score", "nn", "--column", "nn_similarity", "--max-score", cut,
            "--min-score", 0, check=False)
    assert r.returncode == 2 and "give one of --min-score, --top-fraction and --max-score" in r.stderr
    r = cli("data", "subset", ds, "--name", "d3", "--score", "nn", "--column", "nn_sim", "--max-score", cut,
            check=False)
    assert r.returncode == 2 and "--column nn_sim: not in the scores nn" in r.stderr
