"""Indices built out of core from embedding parts in clip-retrieval's layout: precomputed vectors indexed without a
model, IVF shards under a build-memory budget searched together, memory-mapped serving, and bad parts."""
import json

import numpy as np
import pandas as pd
import pytest

from helpers.cli import cli


def clustered(n, d, centers=32, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d))
    x = c[rng.integers(0, centers, n)] + 0.5 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory):
    """20,000 x 64 vectors in three parts named as clip-retrieval names them (natural order: 0, 1, 10), with
    clip-retrieval's metadata columns (image_path, caption, url) and no caption vectors."""
    root = tmp_path_factory.mktemp("emb")
    x = clustered(20_000, 64, centers=20_000)  # hardly clustered: an IVF search must probe lists to find them
    (root / "img_emb").mkdir()
    (root / "metadata").mkdir()
    for name, (lo, hi) in (("0", (0, 7000)), ("1", (7000, 14000)), ("10", (14000, 20000))):
        np.save(root / "img_emb" / f"img_emb_{name}.npy", x[lo:hi].astype(np.float16 if name == "1" else np.float32))
        pd.DataFrame({"image_path": [f"img/{i:06d}.jpg" for i in range(lo, hi)],
                      "caption": [f"caption {i}" for i in range(lo, hi)],
                      "url": [f"http://example.invalid/{i}.jpg" for i in range(lo, hi)]}).to_parquet(
            root / "metadata" / f"metadata_{name}.parquet")
    stored = np.concatenate([x[:7000], x[7000:14000].astype(np.float16).astype(np.float32), x[14000:]])
    return root, stored


def test_precomputed_embeddings_are_indexed_and_served_without_a_model(emb_dir, tmp_path):
    from psdclip.index.searcher import Searcher

    root, x = emb_dir
    out = tmp_path / "idx"
    r = cli("index", "build", "--embeddings", root, "--out", out, "--no-progress")
    info = json.load(open(out / "index.json"))
    assert info["count"] == 20_000 and info["checkpoint"] is None and "captions.faiss" not in info["files"]
    assert "recall@10 vs exact" in r.stdout
    q = clustered(20, 64, seed=5)
    np.save(tmp_path / "q.npy", q[0])
    res = json.loads(cli("index", "query", out, "--embedding", tmp_path / "q.npy", "-k", 10, "--json").stdout)
    exact = np.argsort(-(x @ q[0]))[:10]
    assert [h["id"] for h in res] == exact.tolist()  # Flat: exactly the brute-force neighbours
    assert [h["key"] for h in res] == [f"img/{i:06d}.jpg" for i in exact]  # image_path is the key
    assert res[0]["caption"] == f"caption {exact[0]}"
    s = Searcher(str(out))
    assert s.metadata([int(exact[0]), 10**9])[0]["metadata"]["url"] == f"http://example.invalid/{exact[0]}.jpg"
    assert s.id_of(f"img/{exact[1]:06d}.jpg") == exact[1]
    ids = np.random.default_rng(0).integers(0, 20_000, 300)  # rows from all three record batches, any order
    assert len(s.batches) == 3 and s.take(ids) == s.meta.take(ids).to_pydict()
    # text queries need a model: a clear one-line error, and an image->text search has no caption vectors
    r = cli("index", "query", out, "--text", "a red circle", check=False)
    assert r.returncode == 2 and "need a model" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(ValueError, match="no caption vectors"):
        s.search(embedding=q[0], modality="text")


def test_ivf_shards_under_a_build_budget_search_as_one_index(emb_dir, tmp_path):
    """A build budget far below the filled index makes the build write IVF shards (one trained quantizer); searched
    together (faiss.IndexShards over memory-mapped shards) with every list probed they give exact search's
    answers, and their recall is what index.json records."""
    from psdclip.index import ann
    from psdclip.index.searcher import Searcher

    root, x = emb_dir
    out = tmp_path / "sharded"
    cli("index", "build", "--embeddings", root, "--out", out, "--factory", "IVF16,Flat", "--max-build-memory", "4MB",
        "--no-progress", "--target-recall", "1.0")
    info = json.load(open(out / "index.json"))
    files = info["files"]["index.faiss"]
    assert len(files) >= 3 and all((out / f).is_file() for f in files), files
    assert "IVF shards" in info["layout"]["index.faiss"]
    assert info["recall_at_k"]["index.faiss"]["recall"] == 1.0 and info["search_params"]["index.faiss"]["value"] == 16
    s = Searcher(str(out))
    q = clustered(50, 64, seed=7)
    got = s.search_vectors(q, [10] * 50)
    _, exact = ann.exact_knn(x, q, 10)
    assert [[h["id"] for h in hits] for hits in got] == exact.tolist()
    # with fewer lists probed, still the recall tuning measured, within sampling noise
    ann.set_param(s.indices["image"], "nprobe", 2)
    approx = np.array([[h["id"] for h in hits] for hits in s.search_vectors(q, [10] * 50)])
    assert 0.3 < ann.recall_at_k(approx, exact, 10) < 1.0
    # a non-IVF index cannot be sharded: the build says so before doing the work
    r = cli("index", "build", "--embeddings", root, "--out", tmp_path / "flat", "--factory", "HNSW32,Flat",
            "--max-build-memory", "2MB", "--no-progress", check=False)
    assert r.returncode == 2 and "only IVF indices can be built in shards" in r.stderr


def test_bad_embedding_parts_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad"
    r = cli("index", "build", "--embeddings", bad, "--out", tmp_path / "o", check=False)
    assert r.returncode == 2 and "no img_emb/ folder" in r.stderr
    (bad / "img_emb").mkdir(parents=True)
    (bad / "text_emb").mkdir()
    (bad / "metadata").mkdir()
    np.save(bad / "img_emb" / "img_emb_0.npy", clustered(100, 16))
    np.save(bad / "text_emb" / "text_emb_0.npy", clustered(90, 16))
    r = cli("index", "build", "--embeddings", bad, "--out", tmp_path / "o", check=False)
    assert r.returncode == 2 and "text_emb_0.npy" in r.stderr and "differs" in r.stderr
    np.save(bad / "text_emb" / "text_emb_0.npy", clustered(100, 16))
    pd.DataFrame({"caption": ["x"] * 99}).to_parquet(bad / "metadata" / "metadata_0.parquet")
    r = cli("index", "build", "--embeddings", bad, "--out", tmp_path / "o", check=False)
    assert r.returncode == 2 and "99 rows for 100 image vectors" in r.stderr
    (bad / "metadata" / "metadata_0.parquet").unlink()
    (bad / "img_emb" / "img_emb_1.npy").write_bytes(b"not numpy")
    r = cli("index", "build", "--embeddings", bad, "--out", tmp_path / "o", check=False)
    assert r.returncode == 2 and "img_emb_1.npy: not a .npy array" in r.stderr
    r = cli("index", "build", "--embeddings", bad, "--data", bad, "--out", tmp_path / "o", check=False)
    assert r.returncode == 2 and "not both" in r.stderr
    assert not (tmp_path / "o" / "index.json").exists()


def test_under_torchrun_only_rank_0_builds_from_precomputed_embeddings(emb_dir, tmp_path, monkeypatch):
    """With --embeddings there is nothing to embed: a rank other than 0 writes nothing (every rank writing the same
    index files would race) and says rank 0 builds."""
    from psdclip.index.build import build_index
    from psdclip.index.config import IndexBuildConfig

    root, _ = emb_dir
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    doc = build_index(IndexBuildConfig(embeddings=str(root), out=str(tmp_path / "idx"), progress=False))
    assert doc["rank"] == 1 and not (tmp_path / "idx").exists()
