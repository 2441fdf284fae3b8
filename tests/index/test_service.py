"""The index and the service end to end: a real uvicorn on 127.0.0.1, clip-retrieval-shaped requests,
bounds and bad input, reload, and the web page in headless Chromium."""
import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow.feather
import pytest
import requests
from PIL import Image

from helpers.cli import BIN, cli
from helpers.service import free_port, start_service


@pytest.fixture(scope="module")
def index_dir(dataset_dir, runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("index")
    cli("index", "build", "--checkpoint", runs[1], "--data", dataset_dir, "--out", root / "idx", "--no-progress",
        "--workers", 0)
    return root / "idx"


def test_index_build_query_and_resume(index_dir, dataset_dir, tmp_path):
    info = json.load(open(index_dir / "index.json"))
    assert info["count"] == 300 and info["dim"] == 128 and info["factory"] == "Flat"
    assert info["recall_at_k"]["index.faiss"]["recall"] == 1.0 and len(info["checkpoint_sha256"]) == 64
    meta = pyarrow.feather.read_table(index_dir / "metadata.arrow").to_pandas()  # Arrow IPC: any tool reads it
    assert meta["id"].tolist() == list(range(300)) and set(meta["key"]) == set(
        pd.read_parquet(dataset_dir / "manifest")["key"])
    res = json.loads(cli("index", "query", index_dir, "--text", "two red circles", "-k", 5, "--json").stdout)
    assert len(res) == 5 and res[0]["score"] >= res[-1]["score"]
    # the results equal an exact search over the stored embeddings (clip-retrieval's layout, one part per shard)
    from psdclip.index import parts as P
    from psdclip.index.searcher import Searcher

    parts, dim = P.list_parts(str(index_dir / "embeddings"))
    assert [p.name for p in parts] == ["00000", "00001", "00002"] and dim == 128
    img = np.concatenate([np.load(p.image) for p in parts])
    keys = pd.concat([pd.read_parquet(p.metadata) for p in parts])["key"].to_numpy()
    assert list(keys) == meta["key"].tolist()
    s = Searcher(str(index_dir))
    q = s.embed_text(["two red circles"])
    exact = np.argsort(-(img @ q[0]))[:5]
    assert [r["key"] for r in res] == list(keys[exact])
    # key -> id through the key-ordered ids (a binary search), for every key and a missing one
    assert all(s.id_of(k) == i for i, k in enumerate(keys))
    with pytest.raises(KeyError):
        s.id_of("no-such-key")
    # image -> text and de-duplication
    first = Image.open(io.BytesIO(s.image_bytes(res[0]["key"])))
    assert s.search(image=first, k=1)[0]["key"] == res[0]["key"]
    assert len(s.search(image=first, k=3, modality="text")) == 3
    # an IVF index, forced, is checked against exact search at build time; resume redoes one missing shard
    out = tmp_path / "ivf"
    shutil.copytree(index_dir, out)
    for f in (out / "embeddings").glob("*/*_00001.*"):
        f.unlink()
    cli("index", "build", "--checkpoint", info["checkpoint"], "--data", dataset_dir, "--out", out, "--factory",
            "IVF4,Flat", "--no-progress", "--workers", 0)
    ivf = json.load(open(out / "index.json"))
    assert ivf["factory"] == "IVF4,Flat" and ivf["recall_at_k"]["index.faiss"]["recall"] >= 0.95
    assert ivf["search_params"]["index.faiss"]["param"] == "nprobe"
    redone = np.load(out / "embeddings" / "img_emb" / "img_emb_00001.npy")
    np.testing.assert_array_equal(redone, np.load(parts[1].image))  # the same vectors, read and batched the same
    # bad input
    r = cli("index", "query", index_dir, "--text", "x", "--image", "y", check=False)
    assert r.returncode == 2 and "exactly one of" in r.stderr
    r = cli("index", "query", tmp_path, "--text", "x", check=False)
    assert r.returncode == 2 and "not a psdclip index" in r.stderr


def test_two_torchrun_ranks_embed_the_vectors_one_process_does(index_dir, dataset_dir, tmp_path):
    """Each rank takes every other shard (and its loader worker reads them whole, front to back); rank 0 builds the
    index once every part is in. The parts are bit-identical to the one-process build's."""
    info = json.load(open(index_dir / "index.json"))
    out = tmp_path / "two"
    r = subprocess.run([os.path.join(BIN, "torchrun"), "--standalone", "--nproc-per-node", "2", "-m",
                        "psdclip.workflows.cli", "index", "build", "--checkpoint", info["checkpoint"], "--data",
                        str(dataset_dir), "--out", str(out), "--no-progress", "--workers", "1"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 1: embedded" in r.stdout and "indexed 300 images" in r.stdout
    for kind in ("img_emb", "text_emb"):
        for f in sorted((index_dir / "embeddings" / kind).glob("*.npy")):
            np.testing.assert_array_equal(np.load(out / "embeddings" / kind / f.name), np.load(f))
    assert json.load(open(out / "index.json"))["count"] == 300


def test_the_query_thread_uses_the_configured_thread_count():
    """OpenMP's thread count is per thread: the service sets faiss' (and its BLAS') in the thread that searches."""
    import faiss

    from psdclip.index.batcher import Batcher

    for n in (1, 3):
        assert Batcher(threads=n).executor.submit(faiss.omp_get_max_threads).result() == n


def test_text_embedding_cache_is_lru_and_changes_no_result(index_dir):
    from psdclip.index.searcher import Searcher

    plain, cached = Searcher(str(index_dir)), Searcher(str(index_dir), text_cache=2)
    first = cached.embed_text(["a red circle", "two blue squares", "a red circle"])  # the repeat: encoded once
    assert (cached.cache_hits, cached.cache_misses) == (0, 3) and np.array_equal(first[0], first[2])
    second = cached.embed_text(["a red circle", "a green star"])
    assert (cached.cache_hits, cached.cache_misses) == (1, 4)
    assert list(cached.text_cache) == ["a red circle", "a green star"]  # "two blue squares" was least recent
    texts = ["a red circle", "two blue squares", "a green star"]
    np.testing.assert_allclose(np.stack([first[0], first[1], second[1]]), plain.embed_text(texts), atol=1e-6)
    cached.embed_text(["two blue squares"])
    assert (cached.cache_hits, cached.cache_misses) == (1, 5)
    assert plain.cache_hits == 0 and not plain.text_cache  # 0: off


@pytest.fixture(scope="module")
def service(index_dir):
    proc, base = start_service(f"main={index_dir}", f"other={index_dir}", "--max-k", "50", "--max-body-bytes",
                               "200000", "--body-timeout", "2", env={**os.environ, "PSDCLIP_API_KEY": "s3cret"})
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def b64(img: Image.Image, fmt="JPEG") -> str:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


def test_search_endpoints(service, index_dir):
    h = requests.get(service + "/healthz").json()
    assert h["status"] == "ok" and set(h["indices"]) == {"main", "other"} and h["image_url_search"] is False
    r = requests.post(service + "/search", json={"text": "a blue square", "k": 4}).json()
    assert len(r["results"]) == 4 and r["index"] == "main"
    key = r["results"][0]["key"]
    img = requests.get(f"{service}/images/{key}")
    assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg"
    pic = Image.open(io.BytesIO(img.content))
    same = requests.post(service + "/search", json={"image": b64(pic), "k": 5}).json()["results"]
    # the stored image is the top hit; a barely trained model may embed another image as close (equal up to the
    # float noise between the index's batched encoding and this single query), so ties at the top score count
    assert key in [r["key"] for r in same if r["score"] >= same[0]["score"] - 1e-4], same
    emb = np.random.default_rng(0).normal(size=128).tolist()
    assert len(requests.post(service + "/search", json={"embedding": emb, "k": 3, "modality": "text"}).json()["results"]) == 3
    # clip-retrieval's back-end protocol, shaped as its ClipClient sends it
    knn = requests.post(service + "/knn-service", json={
        "text": "a blue square", "image": None, "image_url": None, "embedding_input": None, "deduplicate": True,
        "use_safety_model": False, "use_violence_detector": False, "indice_name": "other", "use_mclip": False,
        "aesthetic_score": "", "aesthetic_weight": "", "modality": "image", "num_images": 4, "num_result_ids": 4})
    assert knn.status_code == 200
    hits = knn.json()
    assert {"url", "caption", "id", "similarity"} <= set(hits[0]) and len(hits) <= 4
    assert requests.get(service + "/indices-list").json() == ["main", "other"]
    md = requests.post(service + "/metadata", json={"ids": [hits[0]["id"]], "indice_name": "other"}).json()
    assert md[0]["metadata"]["url"] == hits[0]["url"]
    metrics = requests.get(service + "/metrics").text
    assert 'psdclip_requests_total{endpoint="/search",status="200"}' in metrics
    # "a blue square" was asked of "main" by /search, then of "other" by /knn-service: one miss each; again: a hit
    requests.post(service + "/search", json={"text": "a blue square", "k": 1})
    metrics = requests.get(service + "/metrics").text
    assert 'psdclip_text_cache_hits{index="main"} 1.0' in metrics, metrics


def _clip_client_module():
    """clip-retrieval's clip_client.py as the Makefile installs it (files only: the package's pins clash with
    ours, and its __init__ imports its whole back end)."""
    import importlib.util

    path = os.path.join(sys.prefix, "clip-retrieval", "clip_retrieval", "clip_client.py")
    if not os.path.isfile(path):
        pytest.skip("clip-retrieval is not installed beside the venv (make install puts it there)")
    spec = importlib.util.spec_from_file_location("clip_retrieval_client", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_clip_retrievals_own_client_against_the_service(service, tmp_path):
    cc = _clip_client_module()
    client = cc.ClipClient(url=service + "/knn-service", indice_name="other", num_images=5, deduplicate=False)
    by_text = client.query(text="a red circle")
    direct = requests.post(service + "/search", json={"text": "a red circle", "k": 5, "index": "other"}).json()
    assert isinstance(by_text, list), by_text
    assert [h["id"] for h in by_text] == [r["id"] for r in direct["results"]]
    assert all({"url", "caption", "id", "similarity"} <= set(h) for h in by_text)
    pic = requests.get(f"{service}/images/{by_text[0]['key']}").content
    (tmp_path / "q.jpg").write_bytes(pic)
    by_image = client.query(image=str(tmp_path / "q.jpg"))
    assert by_image[0]["id"] == by_text[0]["id"]  # the stored image finds itself first
    emb = np.random.default_rng(1).normal(size=128).tolist()
    captions = cc.ClipClient(url=service + "/knn-service", indice_name="main", num_images=3, deduplicate=False,
                             modality=cc.Modality.TEXT).query(embedding_input=emb)
    assert len(captions) == 3 and captions[0]["similarity"] >= captions[2]["similarity"]
    # the client sends a URL as image_url; the service refuses it (no allowed hosts configured)
    refused = client.query(image="http://127.0.0.1:1/x.jpg")
    assert isinstance(refused, dict) and "not allowed" in refused["detail"]
    # asking for no aesthetic re-ranking (weight 0, any score) is asking for nothing psdclip lacks: answered
    quiet = cc.ClipClient(url=service + "/knn-service", indice_name="other", num_images=3, deduplicate=False,
                          aesthetic_weight=0, aesthetic_score=5).query(text="a red circle")
    assert isinstance(quiet, list) and len(quiet) == 3, quiet
    # what psdclip does not do is never silently ignored: ClipClient's defaults (safety, violence, aesthetic 9 at
    # 0.5) are answered and named as not applied; other values, use_mclip and unknown fields are a 422 naming them
    plain = {"text": "a red circle", "num_images": 2, "indice_name": "other"}
    r = requests.post(service + "/knn-service", data=json.dumps({**plain, "use_safety_model": True,
                                                                "use_violence_detector": True,
                                                                "aesthetic_score": 9, "aesthetic_weight": 0.5}))
    assert r.status_code == 200 and len(r.json()) == 2
    assert r.headers["x-psdclip-not-applied"] == "use_safety_model, use_violence_detector, aesthetic_score"
    r = requests.post(service + "/knn-service", json={**plain, "use_safety_model": False})
    assert r.status_code == 200 and "x-psdclip-not-applied" not in r.headers
    for extra, field in (({"use_mclip": True}, "use_mclip"), ({"aesthetic_score": 5, "aesthetic_weight": 0.5},
                                                              "aesthetic_score"),
                         ({"aesthetic_weight": 0.9}, "aesthetic_weight"), ({"num_imagez": 3}, "num_imagez")):
        r = requests.post(service + "/knn-service", json={**plain, **extra})
        assert r.status_code == 422, (extra, r.text)
        assert field in json.dumps(r.json()["detail"]), (extra, r.text)


def test_concurrent_requests_batched_together_answer_as_alone(service):
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(2)
    bodies = []
    for i in range(24):
        kind = i % 4
        if kind == 0:
            bodies.append({"text": f"a {['red', 'blue', 'green'][i % 3]} shape number {i}", "k": 1 + i % 7})
        elif kind == 1:
            bodies.append({"embedding": rng.normal(size=128).tolist(), "k": 5, "modality": "text"})
        elif kind == 2:
            bodies.append({"text": "two circles", "k": 3, "index": "other", "dedupe": True})
        else:
            bodies.append({"embedding": rng.normal(size=7).tolist(), "k": 2})  # wrong size: a 422 for this one only
    alone = [requests.post(service + "/search", json=b) for b in bodies]
    with ThreadPoolExecutor(24) as pool:
        together = list(pool.map(lambda b: requests.post(service + "/search", json=b), bodies))
    for b, a, t in zip(bodies, alone, together):
        assert a.status_code == t.status_code == (422 if len(b.get("embedding", [0] * 128)) == 7 else 200)
        if a.status_code == 200:
            ra, rt = a.json()["results"], t.json()["results"]
            assert [r["id"] for r in ra] == [r["id"] for r in rt] and len(ra) == min(b["k"], len(ra))
            np.testing.assert_allclose([r["score"] for r in ra], [r["score"] for r in rt], rtol=1e-4, atol=1e-5)
    metrics = dict(line.rsplit(" ", 1) for line in requests.get(service + "/metrics").text.splitlines()
                   if line.startswith("psdclip_query_batch_size_"))
    assert float(metrics["psdclip_query_batch_size_sum"]) > float(metrics["psdclip_query_batch_size_count"])  # batched


def test_bounds_and_bad_requests_get_4xx(service):
    bomb = io.BytesIO()
    Image.new("L", (8000, 8000)).save(bomb, "PNG")  # 64 M pixels declared, a few KB
    cases = [
        ({"text": "x", "k": 0}, 422), ({"text": "x", "k": 51}, 422), ({"text": "x" * 1001}, 422),
        ({}, 422), ({"text": "x", "image": "AAAA"}, 422), ({"image": "not base64!!"}, 400),
        ({"image": base64.b64encode(b"not an image").decode()}, 400),
        ({"image": base64.b64encode(bomb.getvalue()).decode()}, 413),
        ({"image_url": "http://127.0.0.1:1/x.jpg"}, 403), ({"text": "x", "index": "nope"}, 404),
        ({"embedding": [0.0] * 128}, 422), ({"embedding": [1.0] * 5}, 422), ({"text": "x", "bogus": 1}, 422),
        ({"text": "x", "modality": "audio"}, 422), ({"text": "x", "k": True}, 422), ({"text": "x", "k": 2.5}, 422),
    ]
    for body, code in cases:
        r = requests.post(service + "/search", json=body)
        assert r.status_code == code, (body, r.status_code, r.text[:200])
    assert requests.post(service + "/search", data=b"{", headers={"Content-Type": "application/json"}).status_code == 422
    # the query routes are answered before FastAPI's router; their errors keep FastAPI's shape
    detail = requests.post(service + "/search", json={"text": "x", "k": 0}).json()["detail"]
    assert detail[0]["loc"] == ["body", "k"] and detail[0]["type"] == "greater_than_equal", detail
    r = requests.post(service + "/search", data=b'{"text": "x"}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 422 and "must be JSON" in r.json()["detail"]
    assert requests.post(service + "/knn-service", json={"text": "x"}).json()["detail"][0]["loc"] == \
        ["body", "num_images"]
    assert "/search" in requests.get(service + "/openapi.json").json()["paths"]
    # a client that goes away mid-body is counted as 499 (not a 500) and the service goes on
    host, port = service.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"text\": ")
    for _ in range(50):
        if 'psdclip_requests_total{endpoint="/search",status="499"}' in requests.get(service + "/metrics").text:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the half-sent request was not counted as 499")
    # a client that declares more body than it sends, and stays: 408 after --body-timeout, the connection freed
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"text\": ")
        t0 = time.time()
        answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408") and time.time() - t0 < 20, answer[:200]
    for path in ("/metadata",):  # the routes FastAPI answers are bounded alike
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Content-Length: 100\r\n\r\n{{".encode())
            # (FastAPI turns the timeout raised inside its body parsing into its own 400: answered, not held)
            assert sock.recv(4096).split(b"\r\n")[0] in (b"HTTP/1.1 408 Request Timeout", b"HTTP/1.1 400 Bad Request"), \
                path
    # echoed back in the 422: an integer beyond 64 bits and a lone surrogate (found by schemathesis)
    for raw in (b'{"text": "x", "k": 100000000000000000000000000000000000000}', b'{"text": 5, "bogus": "\\udc00"}',
                b'{"num_images": 2, "image_url": {"a": [-1056467582511337704925397480636416]}}'):
        for path in ("/search", "/knn-service"):
            r = requests.post(service + path, data=raw, headers={"Content-Type": "application/json"})
            assert r.status_code == 422, (path, raw, r.status_code, r.text[:200])
    big = requests.post(service + "/search", data=b"x" * 300_000, headers={"Content-Type": "application/json"})
    assert big.status_code == 413
    for path in ("/images/..%2F..%2F..%2Fetc%2Fpasswd", "/images/nope", "/images/%2e%2e"):
        assert requests.get(service + path).status_code == 404
    # a bounded fuzz: random JSON shapes never give a 5xx
    rng = np.random.default_rng(0)
    values = [None, 1, -1, 1e9, "x", "", [], {}, [1.0] * 3, True, "A" * 50]
    fields = ["text", "image", "image_url", "embedding", "k", "modality", "index", "dedupe"]
    for _ in range(150):
        body = {f: values[rng.integers(len(values))] for f in rng.choice(fields, rng.integers(1, 4), replace=False)}
        for endpoint in ("/search", "/knn-service"):
            assert requests.post(service + endpoint, json=body).status_code < 500, body


def test_reload_needs_the_key_and_drops_no_request(service):
    assert requests.post(service + "/admin/reload").status_code == 401
    assert requests.post(service + "/admin/reload", headers={"X-API-Key": "wrong"}).status_code == 401
    import concurrent.futures

    def hammer():
        return [requests.post(service + "/search", json={"text": "a red star", "k": 2}).status_code
                for _ in range(20)]
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        fut = ex.submit(hammer)
        r = requests.post(service + "/admin/reload?index=main", headers={"X-API-Key": "s3cret"})
        codes = fut.result()
    assert r.status_code == 200 and r.json()["reloaded"] == "main"
    assert set(codes) == {200}


def test_web_page_in_headless_chromium(service):
    if not os.path.exists("/usr/bin/chromium") or not os.path.exists("/usr/bin/chromedriver"):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    wait = WebDriverWait(driver, 30)

    def hits():  # read in one script call (the results may be re-rendered between two element lookups)
        return driver.execute_script("return [...document.querySelectorAll('.hit .cap')].map(e => e.textContent)")

    try:
        driver.get(service + "/")
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        # two indices served: the selector shows them; no allowed hosts: no image-URL field
        index = driver.find_element(By.ID, "index")
        assert [o.text for o in index.find_elements(By.TAG_NAME, "option")] == ["main", "other"]
        assert index.is_displayed() and not driver.find_element(By.ID, "image-url").is_displayed()
        driver.find_element(By.ID, "query").send_keys("two green triangles")
        driver.find_element(By.ID, "search-text").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".hit img")) == 12)
        imgs = driver.find_elements(By.CSS_SELECTOR, ".hit img")
        wait.until(lambda d: all(i.get_attribute("naturalWidth") not in ("0", None) for i in imgs))
        assert "results in" in driver.find_element(By.ID, "status").text
        first = hits()
        assert first[0]
        # each result shows its caption and source URL, as /search answers them
        direct = requests.post(service + "/search", json={"text": "two green triangles", "k": 12,
                                                          "index": "main"}).json()["results"]
        assert first == [r["caption"] for r in direct]
        link = driver.find_elements(By.CSS_SELECTOR, ".hit .src a")[0]
        assert link.get_attribute("href") == direct[0]["url"]
        # the query lives in the page's URL: shareable as it is
        assert "q=two+green+triangles" in driver.current_url and "k=12" in driver.current_url
        shared = driver.current_url
        # a click on a result searches by that image: the URL names its key; the image finds itself first
        imgs[3].click()
        wait.until(lambda d: "key=" + direct[3]["key"] in d.current_url)
        wait.until(lambda d: hits() and hits() != first)
        by_image = driver.find_elements(By.CSS_SELECTOR, ".hit img")[0].get_attribute("src")
        assert direct[3]["key"] in by_image or hits()[0] == direct[3]["caption"]
        # the back button returns to the text search and runs it again
        driver.back()
        wait.until(lambda d: d.current_url == shared)
        wait.until(lambda d: hits() == first)
        assert driver.find_element(By.ID, "query").get_attribute("value") == "two green triangles"
        # a shared URL opens on its search, index and k included
        driver.get(service + "/?q=a+red+circle&k=5&index=other")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".hit")) == 5)
        assert driver.find_element(By.ID, "index").get_attribute("value") == "other"
        want = requests.post(service + "/search", json={"text": "a red circle", "k": 5, "index": "other"}).json()
        assert hits() == [r["caption"] for r in want["results"]]
        driver.save_screenshot(os.path.join(os.environ.get("PSDCLIP_SCREENSHOTS", "/tmp"), "psdclip-page.png"))
    finally:
        driver.quit()


def test_schemathesis_over_the_openapi_schema_finds_no_5xx(service):
    st = os.path.join(BIN, "st")
    if not os.path.exists(st):
        pytest.skip("schemathesis is not installed (it is in the dev extra)")
    r = subprocess.run([st, "run", service + "/openapi.json", "--checks", "not_a_server_error", "--max-examples", "15",
                        "--request-timeout", "20", "--no-color"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:]


def test_image_url_fetches_are_checked_bounded_and_quiet_and_a_bad_reload_is_409(index_dir, tmp_path):
    """Every redirect hop is checked against the allow-list; connection errors do not tell which ports are open;
    slow hosts hit a total deadline and a bound on fetches in flight while the rest of the service answers; a
    reload of a damaged index answers 409 with the reason and keeps the old index serving."""
    import concurrent.futures

    from helpers.servers import Server

    idx = tmp_path / "idx"
    shutil.copytree(index_dir, idx)
    proc, base = start_service(idx, "--allowed-url-hosts", "localhost", "--fetch-timeout", "2", "--api-key", "k")
    try:
        with Server(None) as web:
            local = f"http://localhost:{web.server_address[1]}"

            def ask(url):
                return requests.post(base + "/search", json={"image_url": url, "k": 2}, timeout=60)

            assert ask(local + "/ok/a.jpg").status_code == 200
            assert requests.get(base + "/healthz").json()["image_url_search"] is True  # the page shows its URL field
            r = ask(local + "/bad/redirect-ip.jpg")  # localhost -> 127.0.0.1: not on the list
            assert r.status_code == 403 and "redirects to a host that is not allowed" in r.json()["detail"]
            assert web.hits["/ok/target.jpg"] == 0
            # URLs the downloader's check refuses are a 403, never a 500 (urlsplit raised on the first)
            for bad in ("http://[::1/x.jpg", f"http://127.0.0.1:9001\\@localhost:{web.server_address[1]}/ok/a.jpg",
                        f"http://u:pw@localhost:{web.server_address[1]}/ok/a.jpg", "http://localhost:99999/x.jpg"):
                assert ask(bad).status_code == 403, bad
            r = ask(f"http://localhost:{free_port()}/x.jpg")
            assert r.status_code == 502 and r.json()["detail"] == "could not fetch image_url"
            with concurrent.futures.ThreadPoolExecutor(12) as ex:
                slow = [ex.submit(ask, local + "/bad/trickle.jpg") for _ in range(12)]
                time.sleep(0.5)
                t0 = time.time()
                assert requests.get(base + "/healthz", timeout=5).ok and time.time() - t0 < 2
                codes = sorted(f.result().status_code for f in slow)
            assert set(codes) == {503, 504} and codes.count(504) <= 8, codes
        # a damaged file put in place as writers do, by rename (the service memory-maps the old one, which stays
        # valid; truncating a mapped file in place would pull the pages from under it: the docs say so)
        (idx / "damaged.tmp").write_bytes((idx / "index.faiss").read_bytes()[:100])
        os.replace(idx / "damaged.tmp", idx / "index.faiss")
        r = requests.post(base + "/admin/reload", headers={"X-API-Key": "k"})
        assert r.status_code == 409 and "could not load" in r.json()["detail"]
        assert requests.post(base + "/search", json={"text": "a red star", "k": 2}).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert b"reload of" in proc.stderr.read()  # the failure is in the log with its traceback


def test_hostile_hosts_clients_and_reloads_get_a_status_never_a_500_or_a_held_connection(index_dir, tmp_path):
    """An allowed image_url host that sends more than 100 headers or cuts a chunked body: 502 (was a 500 and a
    traceback). A reload whose metadata does not match its vectors: 409, the old index keeps serving (it was
    accepted, then every /search was a 500). Connections that never finish their request head are closed after
    --head-timeout while the service answers (200 of them were held indefinitely)."""
    import pyarrow.feather as feather

    from helpers.servers import Server

    idx = tmp_path / "idx"
    shutil.copytree(index_dir, idx)
    proc, base = start_service(idx, "--allowed-url-hosts", "localhost", "--fetch-timeout", "5", "--api-key", "k",
                               "--head-timeout", "1", "--max-connections", "300")
    try:
        with Server(None) as web:
            local = f"http://localhost:{web.server_address[1]}"
            for path in ("/bad/many-headers.jpg", "/bad/chunked-cut.jpg"):
                r = requests.post(base + "/search", json={"image_url": local + path, "k": 2}, timeout=60)
                assert r.status_code == 502 and r.json()["detail"] == "could not fetch image_url", (path, r.text)
        table = feather.read_table(idx / "metadata.arrow")
        feather.write_feather(table.slice(0, table.num_rows - 5), idx / "short.arrow", compression="uncompressed")
        os.replace(idx / "short.arrow", idx / "metadata.arrow")  # vectors of N rows, metadata of N - 5
        r = requests.post(base + "/admin/reload", headers={"X-API-Key": "k"})
        assert r.status_code == 409 and "inconsistent index" in r.json()["detail"], r.text
        assert requests.post(base + "/search", json={"text": "a red star", "k": 2}).status_code == 200
        port = int(base.rsplit(":", 1)[1])
        held = []
        for _ in range(200):  # request heads that never end, a byte now and then
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            held.append(s)
        assert requests.get(base + "/healthz", timeout=5).ok
        for _ in range(3):
            time.sleep(0.5)
            for s in held:
                with contextlib.suppress(OSError):
                    s.sendall(b"X-Slow: 1\r\n")
        time.sleep(1.0)
        closed = 0
        for s in held:
            try:
                closed += s.recv(1) == b""
            except OSError:
                closed += 1
            s.close()
        assert closed == len(held), f"{len(held) - closed} slow connections still held"
        assert requests.get(base + "/healthz", timeout=5).ok
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_workers_that_cannot_load_the_model_end_the_service_with_one_line(index_dir, tmp_path):
    """A checkpoint that is missing is caught before any worker starts; one that the workers cannot load stops the
    service (uvicorn would restart the failing workers for ever) with the workers' reason, exit 2."""
    idx = tmp_path / "idx"
    shutil.copytree(index_dir, idx)
    info = json.loads((idx / "index.json").read_text())
    bad = tmp_path / "damaged.pt"
    (idx / "index.json").write_text(json.dumps({**info, "checkpoint": str(bad), "checkpoint_relative": None}))
    for why in ("is missing", "not a loadable checkpoint"):
        if why != "is missing":  # the file the index names, damaged (a different file is refused before: its sha256)
            bad.write_bytes(b"damaged on disk")
            (idx / "index.json").write_text(json.dumps({**info, "checkpoint": str(bad), "checkpoint_relative": None,
                                                        "checkpoint_sha256": hashlib.sha256(b"damaged on disk")
                                                        .hexdigest()}))
        r = subprocess.run([os.path.join(BIN, "psdclip"), "serve", str(idx), "--workers", "2", "--port", "0"],
                           capture_output=True, text=True, timeout=300)
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("psdclip: error")]
        assert r.returncode == 2 and len(errors) == 1 and why in errors[0] and str(bad) in errors[0], r.stderr[-2000:]
        assert "Traceback" not in r.stderr, r.stderr[-2000:]


def test_worker_processes_share_the_port_and_a_reload_reaches_every_one(index_dir, tmp_path):
    """`--workers 2`: two processes answer on one port; /admin/reload on one answers once both serve the rebuilt
    index (here: its metadata replaced by rename, as a rebuild does); /metrics sums over both."""
    import pyarrow as pa
    import pyarrow.feather as feather

    idx = tmp_path / "idx"
    shutil.copytree(index_dir, idx)
    proc, base = start_service(idx, "--workers", "2", "--api-key", "k")

    def workers(until):
        """pid -> the generations it serves, over fresh connections (the kernel hands each to either process)
        until both have answered and until(generations) holds for both (the second may still be starting)."""
        seen, deadline = {}, time.time() + 120
        while time.time() < deadline:
            w = requests.get(base + "/healthz", timeout=5).json()["worker"]
            seen[w["pid"]] = w["generations"]
            if len(seen) == 2 and all(until(g) for g in seen.values()):
                return seen
            time.sleep(0.02)
        raise AssertionError(f"workers seen: {seen}")

    try:
        pids = set(workers(lambda g: True))
        assert len(pids) == 2 and proc.pid not in pids
        before = requests.post(base + "/search", json={"text": "a red star", "k": 3}).json()["results"]
        meta = feather.read_table(idx / "metadata.arrow")
        upper = meta.set_column(meta.schema.get_field_index("caption"), "caption",
                                pa.array([c.upper() for c in meta.column("caption").to_pylist()]))
        feather.write_feather(upper, idx / "metadata.tmp", compression="uncompressed")
        os.replace(idx / "metadata.tmp", idx / "metadata.arrow")
        r = requests.post(base + "/admin/reload", headers={"X-API-Key": "k"})
        assert r.status_code == 200 and r.json()["workers"] == r.json()["of_workers"] == 2
        for _ in range(40):  # every answer, from either process, comes from the reloaded index
            res = requests.post(base + "/search", json={"text": "a red star", "k": 3}).json()["results"]
            assert [x["caption"] for x in res] == [x["caption"].upper() for x in before]
        assert set(workers(lambda g: g.get(idx.name) == 1)) == pids  # both serve generation 1, none restarted
        metrics = requests.get(base + "/metrics").text
        total = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                    if line.startswith('psdclip_requests_total{endpoint="/search",status="200"'))
        assert total == 41
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode is not None


def test_parts_of_another_dataset_are_embedded_again_and_an_index_folder_moves(index_dir, dataset_dir, tmp_path,
                                                                               monkeypatch):
    """An index build into a folder whose embedding parts came from another dataset re-embeds them (parts were matched
    by shard number: index.json named the new dataset while vectors and /images came from the old one). index.json's
    checkpoint works from any directory and after the index folder moves with its checkpoint."""
    from psdclip.index.searcher import Searcher

    # B: the same images with shards 0 and 1 swapped (what another build of the same list in another order gives)
    b = tmp_path / "b"
    shutil.copytree(dataset_dir, b)
    for kind, name in (("shards", "{:05d}.tar"), ("manifest", "shard-{:05d}.parquet")):
        first, second = b / kind / name.format(0), b / kind / name.format(1)
        os.replace(first, tmp_path / "swap")
        os.replace(second, first)
        os.replace(tmp_path / "swap", second)
    for s in (0, 1):
        m = pd.read_parquet(b / "manifest" / f"shard-{s:05d}.parquet")
        m["shard"] = s
        m.to_parquet(b / "manifest" / f"shard-{s:05d}.parquet", index=False)
    info_b = json.loads((b / "dataset.json").read_text())
    (b / "dataset.json").write_text(json.dumps({**info_b, "id": "b-build"}))
    out = tmp_path / "idx"
    shutil.copytree(index_dir, out)
    ckpt = json.load(open(index_dir / "index.json"))["checkpoint"]
    cli("index", "build", "--checkpoint", ckpt, "--data", b, "--out", out, "--no-progress", "--workers", 0)
    assert json.load(open(out / "index.json"))["dataset"] == str(b)
    assert json.load(open(out / "embeddings" / "made_from.json"))["dataset_id"] == "b-build"
    a_emb, b_emb = index_dir / "embeddings", out / "embeddings"
    np.testing.assert_array_equal(np.load(b_emb / "img_emb" / "img_emb_00000.npy"),
                                  np.load(a_emb / "img_emb" / "img_emb_00001.npy"))
    keys = pd.read_parquet(b_emb / "metadata" / "metadata_00000.parquet")["key"].tolist()
    assert keys == pd.read_parquet(a_emb / "metadata" / "metadata_00001.parquet")["key"].tolist()
    s = Searcher(str(out), load_model=False)
    row = pd.read_parquet(b / "manifest" / "shard-00000.parquet").set_index("key").loc[keys[0]]
    with open(b / "shards" / "00000.tar", "rb") as f:
        f.seek(int(row["offset"]))
        assert s.image_bytes(keys[0]) == f.read(int(row["size"]))
    # a checkpoint given relative to where the build ran; then index and checkpoint move together
    pack = tmp_path / "pack"
    pack.mkdir()
    shutil.copy(ckpt, pack / "model.pt")
    monkeypatch.chdir(pack)
    cli("index", "build", "--checkpoint", "model.pt", "--data", dataset_dir, "--out", "idx", "--no-progress",
        "--workers", 0)
    monkeypatch.chdir(tmp_path)
    os.replace(pack, tmp_path / "moved")
    res = json.loads(cli("index", "query", tmp_path / "moved" / "idx", "--text", "a red circle", "-k", 3,
                         "--json").stdout)
    assert len(res) == 3


def test_a_budget_that_cannot_give_the_target_recall_is_said_recorded_and_strict_fails(index_dir, dataset_dir,
                                                                                      tmp_path):
    info = json.load(open(index_dir / "index.json"))
    args = ["index", "build", "--checkpoint", info["checkpoint"], "--data", dataset_dir, "--factory", "IVF4,SQ4",
            "--target-recall", "1.0", "--no-progress", "--workers", 0]
    r = cli(*args, "--out", tmp_path / "a")
    assert "warning: index.faiss: recall@k" in r.stderr and "< --target-recall 1" in r.stderr, r.stderr[-2000:]
    missed = json.load(open(tmp_path / "a" / "index.json"))["budget_missed"]["index.faiss"]
    assert missed["target"] == 1.0 and missed["within_budget"]["recall"] < 1.0
    r = cli(*args, "--out", tmp_path / "b", "--strict", check=False)
    assert r.returncode == 1 and "psdclip: error: --strict: index.faiss: recall@k" in r.stderr, r.stderr[-2000:]
    assert (tmp_path / "b" / "index.json").is_file()  # written all the same
