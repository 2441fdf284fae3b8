"""psdclip's service and clip-retrieval's back end side by side, recorded in BENCHMARKS.md: the same collection
(the demo's index: its faiss files and its metadata), the same model weights, the same load (wrk on loopback,
POST /knn-service with clip-retrieval's request shape, which both answer), text and embedding queries, 1 and 32
clients in a closed loop: QPS, p50/p99 and errors. Before the load, both answer the same text queries and the
top-10 ids are compared (same weights, same index: they should agree).

clip-retrieval's back end runs from its own venv (`--venv`, made when missing: python -m venv, then
`pip install numpy<2 setuptools<81 torch torchvision clip-retrieval==2.45.0`; its pins clash with psdclip's), through
benchmarks/_clip_retrieval_back.py, which replaces only its model loader (no hub) and its listening address
(127.0.0.1). psdclip runs `psdclip serve` with its defaults, with 1 and 2 worker processes.

    python benchmarks/vs_clip_retrieval.py [--seconds 20] [--index DIR] [--venv DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _record import record  # noqa: E402
from service import demo_index, free_port, load_wrk, start_service  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CLIP_RETRIEVAL = "clip-retrieval==2.45.0"


def ensure_venv(venv: str) -> str:
    """clip-retrieval's venv, made when missing; its Python."""
    py = os.path.join(venv, "bin", "python")
    if os.path.exists(py) and subprocess.run([py, "-c", "import clip_retrieval.clip_back, all_clip"],
                                             capture_output=True).returncode == 0:
        return py
    print(f"making clip-retrieval's venv in {venv} (a few minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    # numpy<2: its pins; setuptools<81: clip-anytorch imports pkg_resources, which setuptools 81 removed (and torch
    # 2.14 needs >= 77)
    subprocess.run([py, "-m", "pip", "install", "-q", "numpy<2", "setuptools>=77,<81", "torch==2.14.1",
                    "torchvision==0.29.1", CLIP_RETRIEVAL], check=True)
    return py


def clip_retrieval_folder(idx: str, out: str) -> str:
    """clip-retrieval's index layout over the psdclip index's own files (links, no copies): image.index,
    text.index, metadata/ (Arrow IPC, rows in id order); and its indices_paths JSON."""
    os.makedirs(os.path.join(out, "demo", "metadata"), exist_ok=True)
    for ours, theirs in (("index.faiss", "image.index"), ("captions.faiss", "text.index"),
                         ("metadata.arrow", os.path.join("metadata", "0.arrow"))):
        link = os.path.join(out, "demo", theirs)
        if not os.path.lexists(link):
            os.symlink(os.path.abspath(os.path.join(idx, ours)), link)
    paths = os.path.join(out, "indices_paths.json")
    with open(paths, "w", encoding="utf-8") as f:
        json.dump({"demo": os.path.join(out, "demo")}, f)
    return paths


def wait_ready(proc, base: str, log: str, seconds: float = 300) -> None:
    """Until clip-retrieval's back end answers (its log, where Flask writes a line per request, is a file: a pipe
    nobody reads would fill and stop it)."""
    import httpx

    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            with open(log, encoding="utf-8", errors="replace") as f:
                raise SystemExit(f"clip-retrieval's back end exited ({proc.returncode}): {f.read()[-2000:]}")
        try:
            if httpx.get(base + "/indices-list", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("clip-retrieval's back end did not answer in time")


def knn(text=None, embedding=None) -> dict:
    """A /knn-service request as clip-retrieval's ClipClient sends it."""
    return {"text": text, "image": None, "image_url": None, "embedding_input": embedding, "modality": "image",
            "num_images": 10, "num_result_ids": 10, "indice_name": "demo", "use_mclip": False,
            "deduplicate": False, "use_safety_model": False, "use_violence_detector": False,
            "aesthetic_score": "", "aesthetic_weight": ""}


def agreement(bases: dict, texts: list[str]) -> float:
    """The share of text queries whose top-10 ids are the same set at every service."""
    import httpx

    same = 0
    for t in texts:
        ids = [frozenset(r["id"] for r in httpx.post(b + "/knn-service", json=knn(text=t), timeout=30).json())
               for b in bases.values()]
        same += all(i == ids[0] for i in ids)
    return same / len(texts)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--index", default="bench-out/demo/index")
    ap.add_argument("--venv", default="bench-out/clip-retrieval-venv")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed (apt install wrk): both services get the same load from it")
    exe, idx = demo_index(args.index, ap.get_default("index"))
    meta = json.load(open(os.path.join(idx, "index.json")))
    py = ensure_venv(args.venv)
    tmp = tempfile.mkdtemp()
    paths = clip_retrieval_folder(idx, tmp)

    import pyarrow.feather as pa_feather

    caps = pa_feather.read_table(os.path.join(idx, "metadata.arrow")).column("caption").to_pylist()
    rng = np.random.default_rng(0)
    workloads = {"text, all distinct": [knn(text=f"{caps[i % len(caps)]} {i}") for i in range(200_000)],
                 "embedding": [knn(embedding=e.tolist()) for e in rng.normal(size=(200, int(meta["dim"])))]}
    port = free_port()
    back = subprocess.Popen([py, os.path.join(HERE, "_clip_retrieval_back.py"), paths, str(port), meta["checkpoint"],
                             os.path.join(ROOT, "train", "model_configs")],
                            stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "back.log"), "w"))
    systems = {"clip-retrieval 2.45.0 (Flask, 1 process)": f"http://127.0.0.1:{port}"}
    servers = [back]
    results, agree = {}, None
    try:
        wait_ready(back, systems["clip-retrieval 2.45.0 (Flask, 1 process)"], os.path.join(tmp, "back.log"))
        for workers in (1, 2):
            server, base = start_service(exe, f"demo={idx}", "--workers", str(workers))
            servers.append(server)
            systems[f"psdclip serve --workers {workers}"] = base
        agree = agreement(systems, [caps[i] for i in rng.choice(len(caps), 50, replace=False)])
        print(f"top-10 agreement {agree:.0%}", flush=True)
        for name, base in systems.items():
            for query, bodies in workloads.items():
                for clients in (1, 32):
                    r = load_wrk(base, bodies, clients, args.seconds, tmp, path="/knn-service")
                    results[(name, query, clients)] = r
                    print(name, query, clients, r, flush=True)
    finally:
        for s in servers:
            s.terminate()
            s.wait()
    rows = "\n".join(f"| {name} | {query} | {clients} | {v['requests']:,} | {v['qps']:.0f} | {v['p50']:.1f} | "
                     f"{v['p99']:.1f} | {v['errors']} |" for (name, query, clients), v in results.items())
    ratios = []
    for query in workloads:
        for clients in (1, 32):
            cr = results[("clip-retrieval 2.45.0 (Flask, 1 process)", query, clients)]
            for workers in (1, 2):
                ps = results[(f"psdclip serve --workers {workers}", query, clients)]
                ratios.append(f"| {query} | {clients} | {workers} | {ps['qps'] / cr['qps']:.1f}x | "
                              f"{ps['p99']:.1f} vs {cr['p99']:.1f} |")
    body = (f"The demo's {meta['count']:,}-image `{meta['factory']}` index and its model ({meta['model_arch']}, step "
            f"{meta['step']}) served by clip-retrieval's back end (its Flask app, memory-mapped faiss index, Arrow "
            f"metadata, run from its own venv; only the model loader is replaced, to load the same weights) and by "
            f"`psdclip serve` with its defaults. Both get the same wrk load on loopback, POST /knn-service with "
            f"clip-retrieval's request shape (k=10), {args.seconds:.0f} s per row, load generator on the same 2 cores. "
            f"Text queries are all distinct (no cache helps). Before the load, {agree:.0%} of 50 caption queries got "
            f"the same top-10 ids from every service.\n\n"
            f"| service | query | clients | requests | QPS | p50 ms | p99 ms | errors |\n"
            f"|---|---|---|---|---|---|---|---|\n{rows}\n\n"
            f"psdclip / clip-retrieval (goal: >= 2x the QPS at equal or lower p99):\n\n"
            f"| query | clients | psdclip workers | QPS ratio | p99 ms, psdclip vs clip-retrieval |\n"
            f"|---|---|---|---|---|\n" + "\n".join(ratios) + "\n")
    record("clip-retrieval", "Service side by side with clip-retrieval's back end", body)


if __name__ == "__main__":
    main()
