import faiss
import numpy as np
import pytest

from psdclip.index import ann
from psdclip.core.errors import InputError


def clustered(n, d, centers=64, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d))
    x = c[rng.integers(0, centers, n)] + 0.35 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_choose_factory_follows_the_budgets():
    assert ann.choose_factory(10_000, 512, 2e9, 10)[0] == "Flat"
    assert ann.choose_factory(1_000_000, 128, 2e9, 10)[0] == "HNSW32,Flat"
    assert ann.choose_factory(1_000_000, 512, 2.5e9, 10)[0] == "IVF4096,PQ128x4fs,RFlat"
    assert ann.choose_factory(1_000_000, 512, 2e9, 10)[0] == "IVF4096,PQ128x4fs,Refine(SQ8)"
    assert ann.choose_factory(1_000_000, 510, 2e9, 10)[0] == "IVF4096,SQ8"  # no fast-scan layout for 510 dims
    assert ann.choose_factory(1_000_000, 512, 1e8, 10)[0] == "OPQ64,IVF4096,PQ64"
    with pytest.raises(InputError, match="--max-memory"):
        ann.choose_factory(10**9, 512, 1e6, 10)


@pytest.mark.parametrize("factory", ["IVF64,Flat", "IVF64,SQ8", "HNSW16,Flat", "OPQ8,IVF64,PQ8",
                                     "IVF64,PQ16x4fs,RFlat", "IVF64,PQ16x4fs,Refine(SQ8)"])
def test_approximate_indices_against_exact_search(factory, tmp_path):
    d = 32 if factory.startswith("OPQ") else 64  # OPQ's rotation training costs ~d^2 per iteration: 16 s, not 34
    xb, xq = clustered(8_000, d), clustered(200, d, seed=1)
    index = ann.build(xb, factory, train_size=4_000)
    # PQ codes alone are lossy (recall vs exact saturates) unless a refine stage re-ranks them; graph search
    # on tight clusters is hard
    refined = "RFlat" in factory or "Refine" in factory
    target = 0.5 if "PQ" in factory and not refined else 0.9 if "HNSW" in factory else 0.95
    _, exact = ann.exact_knn(xb, xq, 10)
    tuned = ann.tune(index, factory, exact, xq, 10, target)
    _, approx = index.search(xq, 10)
    rec = ann.recall_at_k(approx, exact, 10)
    assert rec >= target and abs(rec - tuned["recall"]) < 1e-9
    # save / load round trip keeps the results
    faiss.write_index(index, str(tmp_path / "x.faiss"))
    loaded = faiss.read_index(str(tmp_path / "x.faiss"))
    if tuned["param"]:
        ann.set_param(loaded, tuned["param"], tuned["value"])
    assert np.array_equal(loaded.search(xq, 10)[1], approx)


def test_tuning_measures_recall_past_a_querys_own_vector():
    """Queries drawn from the collection find themselves at rank 1; tuning drops that hit from both sides, so the
    recall it stores is the recall of the other neighbours, which an IVF index with few lists probed finds less
    often than the query itself."""
    xb = clustered(8_000, 32, centers=4_000)
    own = np.arange(0, 8_000, 40)
    index = ann.build(xb, "IVF64,Flat", train_size=4_000)
    _, exact = ann.exact_knn(xb, xb[own], 11)
    assert (exact[:, 0] == own).all()
    ann.set_param(index, "nprobe", 1)
    _, approx = index.search(xb[own], 11)
    with_self = ann.recall_at_k(approx[:, :10], exact[:, :10], 10)
    past_self = ann.recall_at_k(ann.drop_self(approx, own, 10), ann.drop_self(exact, own, 10), 10)
    assert past_self < with_self
    tuned = ann.tune(index, "IVF64,Flat", exact, xb[own], 10, 0.99, self_ids=own)
    assert tuned["recall"] >= 0.99 and tuned["value"] > 1
    _, approx = index.search(xb[own], 11)  # the nprobe tuning left set
    assert ann.recall_at_k(ann.drop_self(approx, own, 10), ann.drop_self(exact, own, 10), 10) == tuned["recall"]


def test_training_sample_is_sized_to_the_inverted_lists():
    def size(factory, n, d=64):
        return ann.training_size(faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT), n)

    assert size("IVF4096,Flat", 10**7) == 409_600  # ~100 per list (the old fixed 100,000 was 24 per list)
    assert size("IVF64,Flat", 5_000) == 5_000  # never more than the collection
    assert size("IVF65536,PQ32", 10**9) == ann.MAX_TRAIN_POINTS  # bounded
    assert size("HNSW32,Flat", 10**6) == 10_000 and size("OPQ16,IVF256,PQ16", 10**6) == 25_600


def test_recall_and_shape_checks():
    assert ann.recall_at_k(np.array([[1, 2, 3]]), np.array([[3, 2, 9]]), 3) == 2 / 3
    with pytest.raises(ValueError):
        ann.check_vectors(np.zeros(5), "q")
    with pytest.raises(ValueError):
        ann.check_vectors(np.zeros((2, 5)), "q", dim=4)


def test_dedupe_matches_the_pairwise_rule_and_handles_k_1000():
    """The vectorised greedy de-duplication keeps exactly what comparing each result with every kept one keeps."""
    import faiss

    from psdclip.index.searcher import Searcher

    rng = np.random.default_rng(0)
    base = rng.standard_normal((400, 16)).astype(np.float32)
    near = base[rng.integers(0, 400, 2600)] + 0.02 * rng.standard_normal((2600, 16)).astype(np.float32)
    xb = np.vstack([base, near]).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(16)
    index.add(xb)
    scores, ids = index.search(xb[:1], 3000)
    scores, ids = scores[0], ids[0]
    got_s, got_i = Searcher._dedupe(index, scores, ids, 0.98, k=1000)
    chosen = []
    for j in range(len(ids)):  # the rule, written out
        if all(float(xb[ids[j]] @ xb[ids[c]]) < 0.98 for c in chosen):
            chosen.append(j)
    assert list(got_i) == list(ids[chosen][:1000]) and 300 < len(got_i) <= 1000
    assert np.array_equal(got_s, scores[chosen][:1000])


def test_faiss_comes_from_one_extra_and_its_absence_is_one_line(tmp_path):
    """faiss-cpu and faiss-gpu both install the module `faiss`: neither may be a base dependency, and the [gpu]
    extra must not bring faiss-cpu with it. Without either, a command says what to install."""
    import os
    import subprocess
    import sys
    import tomllib

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]

    def faiss_of(reqs):
        return {r.split(">")[0].split("=")[0].split("[")[0].strip() for r in reqs if r.strip().startswith("faiss")}

    extras = project["optional-dependencies"]
    assert faiss_of(project["dependencies"]) == set()
    assert faiss_of(extras["cpu"]) == {"faiss-cpu"} and faiss_of(extras["gpu"]) == {"faiss-gpu-cu12"}
    assert all(len(faiss_of(reqs)) <= 1 for reqs in extras.values())
    code = ("import sys; sys.modules['faiss'] = None\n"  # as if neither extra were installed
            "from psdclip.workflows.cli import main\n"
            f"sys.exit(main(['index', 'build', '--embeddings', {str(tmp_path)!r}, '--out', {str(tmp_path / 'i')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "psdclip: error: faiss is not installed: pip install 'psdclip[cpu]' (or 'psdclip[gpu]' on a CUDA machine, "
        "not both: each installs the module faiss)"]


def test_tuning_stops_at_a_budget_and_says_which_to_raise():
    """Lossy PQ codes cannot reach a recall of 0.99: the tuner takes the best setting within the latency budget,
    measures past it, and says in one line which budget to raise and what that buys; a latency budget nothing meets
    is reported too. The index is left set as tuned."""
    xb, xq = clustered(8_000, 32), clustered(200, 32, seed=1)
    _, exact = ann.exact_knn(xb, xq, 10)
    index = ann.build(xb, "IVF64,PQ4", train_size=4_000)
    tuned = ann.tune(index, "IVF64,PQ4", exact, xq, 10, 0.99, max_ms=float("inf"))
    assert tuned["recall"] < 0.99 and tuned["missed"]["within_budget"]["recall"] == tuned["recall"]
    assert tuned["value"] <= 64  # the search space's end is every list, not a fixed grid
    _, approx = index.search(xq, 10)
    assert ann.recall_at_k(approx, exact, 10) == tuned["recall"]
    msg = ann.budget_message("index.faiss", tuned, "IVF64,PQ4", "--max-memory")
    assert "< --target-recall 0.99" in msg and "raise --max-memory" in msg
    flat = ann.build(xb, "IVF64,Flat", train_size=4_000)
    never = ann.tune(flat, "IVF64,Flat", exact, xq, 10, 0.99, max_ms=1e-9)  # no setting is that fast
    assert never["missed"]["within_budget"] is None and never["value"] == 1  # (measured up to 20x the budget)
    msg = ann.budget_message("index.faiss", never, "IVF64,Flat", "--max-memory")
    assert "no IVF64,Flat setting answers within --max-query-ms" in msg and "raising --max-query-ms to" in msg
