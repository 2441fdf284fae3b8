"""psdclip demo: the embedded default, end to end on synthetic data served over 127.0.0.1.

synthetic source (noisy captions) -> loopback server -> dataset with nested subsets (Dask + img2dataset)
-> CLIP and PSD trained with equal compute (rn-small) -> both evaluated (zero-shot, linear probe,
retrieval, robustness) and compared -> index of the better model -> the service, with example text and
image queries -> a summary of where everything is.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field

from ..core.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """psdclip demo: synthetic data -> dataset -> CLIP vs PSD -> evaluation -> index -> service."""

    out: str = field(default="demo-out", metadata={"help": "directory for everything the demo writes"})
    n: int = field(default=8000, metadata={"help": "synthetic training pairs"})
    heldout: int = field(default=300, metadata={"help": "held-out scenes for evaluation (each in 6 renderings)"})
    steps: int = field(default=600, metadata={"help": "training steps of each model (equal compute)"})
    batch_size: int = field(default=128, metadata={"help": "training batch size"})
    model: str = field(default="rn-small", metadata={"help": "model preset (rn-small: a ResNet that learns shape on "
                                                              "these 2 cores in minutes; tiny: the small ViT)"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    workers: int = field(default=2, metadata={"help": "Dask worker processes"})
    port: int = field(default=0, metadata={"help": "port of the demo service (0: a free one)"})
    keep_serving: bool = field(default=False, metadata={"help": "keep the service running at the end (Ctrl-C stops)"})

    def __post_init__(self):
        if self.n < 100 or self.heldout < 20 or self.steps < 1:
            raise InputError("--n must be >= 100, --heldout >= 20 and --steps >= 1")


DEMO_DIFFICULTY = {"shape_scale": 1.4, "distractor_frac": 0.0, "backgrounds": 1, "positions": 1, "max_count": 1}


def _step(i: int, msg: str) -> None:
    log.info(f"\n==> [{i}/7] {msg}")


def run_demo(cfg: DemoConfig) -> int:
    from ..pipeline.build import build
    from ..pipeline.config import BuildConfig, SynthConfig
    from ..pipeline.serve import serving
    from ..pipeline.synth import generate, write_url_list
    from ..eval.compare import compare
    from ..eval.config import CompareConfig, EvalConfig
    from ..eval.evaluate import evaluate
    from ..train.config import TrainConfig
    from ..train.loop import train

    t0 = time.time()
    out = os.path.abspath(cfg.out)
    src, ds = os.path.join(out, "synth"), os.path.join(out, "dataset")
    _step(1, f"synthetic source: {cfg.n:,} image-caption pairs with noisy captions, {cfg.heldout} held-out scenes")
    if not os.path.isfile(os.path.join(src, "synth.json")):
        # the declared easier difficulty of the scaling-cpu study (one larger, centred shape on one background, no
        # distractor), so that a model trained for minutes learns shape and visibly answers the example queries
        generate(SynthConfig(out=src, n=cfg.n, seed=cfg.seed, heldout=cfg.heldout, image_size=96, **DEMO_DIFFICULTY))
    with serving(src, again=os.path.join(src, "urls-demo.csv")) as base_url:
        _step(2, f"served on {base_url}; building the dataset through Dask + img2dataset")
        build(BuildConfig(inputs=[write_url_list(src, base_url, name="urls-demo.csv")], out=ds, image_size=64,
                          shard_size=max(200, cfg.n // 6), processes_count=cfg.workers, thread_count=16,
                          subsets=["0.01", "0.1", "1.0"], encode_quality=90))
    runs = {}
    for i, loss in enumerate(("clip", "psd")):
        _step(3, f"training {loss.upper()} ({cfg.steps} steps x {cfg.batch_size}, {cfg.model}, same data and seed)")
        run = os.path.join(out, "runs", loss)
        train(TrainConfig(data=ds, out=run, model=cfg.model, loss=loss, steps=cfg.steps, batch_size=cfg.batch_size,
                          lr=2e-3 if cfg.model == "rn-small" else 1e-3, warmup=0.1, seed=cfg.seed, workers=1,
                          log_every=10,
                          checkpoint_every=cfg.steps, keep=1))
        runs[loss] = run
    results = {}
    for loss, run in runs.items():
        _step(4, f"evaluating {loss.upper()}: zero-shot, linear probe, retrieval, robustness")
        results[loss] = evaluate(EvalConfig(target=run, suite=f"synthetic:{src}", workers=0))["metrics"]
    _step(5, "comparing CLIP and PSD (bootstrap confidence intervals over the held-out scenes)")
    comp = compare(CompareConfig(runs=[runs["clip"], runs["psd"]], out=os.path.join(out, "compare")))
    print(comp["markdown"])
    score = {k: (m["zeroshot_shape_base.top1"] + m["retrieval.t2i_R@1"]) for k, m in results.items()}
    best = max(score, key=score.get)
    _step(6, f"indexing the dataset with the better model ({best.upper()})")
    from ..index.build import IndexBuildConfig, build_index

    index_dir = os.path.join(out, "index")
    info = build_index(IndexBuildConfig(checkpoint=runs[best], data=ds, out=index_dir, workers=0))
    _step(7, "starting the service and running example queries")
    base, server = _start_service(index_dir, cfg.port)
    examples = _example_queries(base, src)
    _summary(out, runs, results, comp, info, base, examples, time.time() - t0)
    if cfg.keep_serving:
        print(f"\nserving on {base} (Ctrl-C stops)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    server.should_exit = True
    return 0


def _start_service(index_dir: str, port: int):
    import socket

    import uvicorn

    from ..index.service import ServeConfig, create_app

    if port == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    app = create_app(ServeConfig(indices=[f"demo={index_dir}"], port=port))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    threading.Thread(target=server.run, daemon=True).start()
    import urllib.request

    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
            break
        except OSError:
            time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def _post(url: str, body: dict) -> dict:
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _example_queries(base: str, src: str) -> list[tuple[str, list[dict]]]:
    out = []
    for text in ("a red circle", "a large blue square", "a small green star"):
        out.append((f"text: {text!r}", _post(base + "/search", {"text": text, "k": 3})["results"]))
    path = os.path.join(src, "heldout", "base", "0000000.jpg")
    with open(path, "rb") as f:
        img = base64.b64encode(f.read()).decode()
    out.append((f"image: {os.path.relpath(path, src)}", _post(base + "/search", {"image": img, "k": 3})["results"]))
    out.append((f"image -> captions: {os.path.relpath(path, src)}",
                _post(base + "/search", {"image": img, "k": 3, "modality": "text"})["results"]))
    return out


def _ground_truth(src: str) -> dict:
    """images/<...>.jpg -> 'size colour shape' of the scene it renders."""
    import pandas as pd

    attrs = pd.read_parquet(os.path.join(src, "attributes.parquet"))
    return {p.rsplit("images/", 1)[-1]: f"{z} {c} {s}" for p, z, c, s in
            zip(attrs["path"], attrs["size"], attrs["colour"], attrs["shape"])}


def _summary(out, runs, results, comp, info, base, examples, seconds) -> None:
    keys = ["zeroshot_shape_base.top1", "zeroshot_shape_base.top5", "linear_probe_shape.accuracy",
            "retrieval.i2t_R@1", "retrieval.t2i_R@1", "retrieval.t2i_R@10", "robustness.sketch", "robustness.noise"]
    print("\n" + "=" * 78)
    print(f"{'metric':<32}{'CLIP':>10}{'PSD':>10}{'PSD - CLIP':>14}")
    for k in keys:
        c, p = results["clip"].get(k), results["psd"].get(k)
        if c is not None and p is not None:
            print(f"{k:<32}{c:>10.3f}{p:>10.3f}{p - c:>+14.3f}")
    print("\nexample queries (served by the demo service; [what the image really shows] from the synthetic source's "
          "ground truth, then the image's own, possibly noisy, caption):")
    truth = _ground_truth(os.path.join(out, "synth"))
    for title, hits in examples:
        print(f"  {title}")
        for h in hits:
            seen = truth.get(h.get("url", "").rsplit("/images/", 1)[-1], "")
            print(f"     {h['score']:.3f}  {'[' + seen + ']' if seen else '':<26}{h['caption'][:50]}")
    print(f"\nruns:      {runs['clip']}  {runs['psd']}  (metrics.jsonl, plots/*.png, eval/)")
    print(f"compare:   {comp['out']}/compare.md, compare.png")
    print(f"index:     {os.path.join(out, 'index')}  ({info['count']} images, {info['factory']})")
    print(f"service:   was at {base}; start it again with `psdclip serve {os.path.join(out, 'index')}`")
    print(f"demo took {seconds:.0f} s")
