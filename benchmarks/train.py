"""Training benchmarks, each a side-by-side ratio measured in one run, recorded in BENCHMARKS.md.

1. PSD step time / CLIP step time: same tiny model, batch 128, in-memory tensors. Goal <= 1.02.
2. Our trainer reading real shards / a pure compute loop on in-memory tensors, samples/s. Goal >= 0.90.
3. Our trainer / open_clip's own loop (open_clip_train) on the same model config, shards and batch,
   samples/s. Goal >= 1.0. (Needs `pip install 'open_clip_torch[training]'`; skipped if absent.)

    python benchmarks/train.py [--images 3000] [--steps 20] [--batch-size 128] [--out bench-out]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _record import record  # noqa: E402

from psdclip.pipeline.build import build  # noqa: E402
from psdclip.pipeline.config import BuildConfig, SynthConfig  # noqa: E402
from psdclip.pipeline.serve import serving  # noqa: E402
from psdclip.pipeline.synth import generate, write_url_list  # noqa: E402
from psdclip.train.config import TrainConfig  # noqa: E402
from psdclip.train.loop import make_loss, param_groups  # noqa: E402
from psdclip.train.models import build_model  # noqa: E402


def step_times(model, loss_fn, images, texts, opt, n):
    times = []
    for step in range(n):
        t = time.perf_counter()
        out = model(images, texts)
        losses = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], step=step)
        sum(v for k, v in losses.items() if k.endswith("_loss")).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times


def psd_vs_clip(args) -> tuple[str, float]:
    torch.manual_seed(0)
    model, _, _, tok = build_model("tiny")
    images = torch.randn(args.batch_size, 3, 64, 64)
    texts = tok(["a photo of two small red circles on a white background"] * args.batch_size)
    opt = torch.optim.AdamW(param_groups(model, 0.2), lr=1e-4)
    losses = {name: make_loss(TrainConfig(data="x", out="y", loss=name, steps=100), 0, 1) for name in ("clip", "psd")}
    step_times(model, losses["clip"], images, texts, opt, 2)  # warm-up
    res = {"clip": [], "psd": []}
    for _ in range(args.rounds):
        for name in ("clip", "psd"):
            res[name] += step_times(model, losses[name], images, texts, opt, 3)
    med = {k: statistics.median(v) for k, v in res.items()}
    ratio = med["psd"] / med["clip"]
    body = (f"tiny model (psdclip-tiny: 64 px ViT 4x192, text 4x128), batch {args.batch_size}, fp32 on CPU, "
            f"full optimizer steps on in-memory tensors, {len(res['clip'])} steps each, alternated in blocks of 3.\n\n"
            f"| loss | median step (s) |\n|---|---|\n| clip | {med['clip']:.3f} |\n| psd | {med['psd']:.3f} |\n\n"
            f"**PSD / CLIP step time = {ratio:.3f}** (goal <= 1.02)\n")
    return body, ratio


def make_dataset(args) -> str:
    ds = os.path.join(args.out, f"train-ds-{args.images}")
    if os.path.isfile(os.path.join(ds, "manifest.parquet")):
        return ds
    src = os.path.join(args.out, f"train-synth-{args.images}")
    if not os.path.isfile(os.path.join(src, "synth.json")):
        generate(SynthConfig(out=src, n=args.images, seed=0, heldout=0, image_size=96), progress=False)
    with serving(src) as base:
        build(BuildConfig(inputs=[write_url_list(src, base, "urls-train-bench.csv")], out=ds, image_size=64,
                          shard_size=500, progress=False))
    return ds


def ours(ds, args) -> float:
    from psdclip.train.loop import train

    run = os.path.join(args.out, "train-ours")
    shutil.rmtree(run, ignore_errors=True)
    train(TrainConfig(data=ds, out=run, model="tiny", loss="psd", steps=args.steps, batch_size=args.batch_size,
                      workers=args.workers, log_every=1, checkpoint_every=10_000, warmup=5, progress=False,
                      shuffle_buffer=500))
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    return statistics.median(r["samples_per_s"] for r in rows[3:]), statistics.median(r["data_wait_frac"] for r in rows[3:])


def compute_only(args) -> float:
    torch.manual_seed(0)
    model, _, _, tok = build_model("tiny")
    images = torch.randn(args.batch_size, 3, 64, 64)
    texts = tok(["a photo of two small red circles on a white background"] * args.batch_size)
    opt = torch.optim.AdamW(param_groups(model, 0.2), lr=1e-4)
    loss = make_loss(TrainConfig(data="x", out="y", loss="psd", steps=args.steps), 0, 1)
    times = step_times(model, loss, images, texts, opt, args.steps)[3:]
    return args.batch_size / statistics.median(times)


def open_clip_train(ds, args) -> float | None:
    try:
        import open_clip_train  # noqa: F401
    except ImportError:
        return None
    shards = sorted(glob.glob(os.path.join(ds, "shards", "*.tar")))
    spec = os.path.join(ds, "shards", "{%s..%s}.tar" % (os.path.basename(shards[0])[:-4], os.path.basename(shards[-1])[:-4]))
    logs = os.path.join(args.out, "openclip-logs")
    shutil.rmtree(logs, ignore_errors=True)
    cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "_openclip_train.py"), "--train-data", spec,
           "--train-num-samples", str(args.steps * args.batch_size), "--dataset-type", "webdataset",
           "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--precision", "fp32",
           "--epochs", "1", "--model", "psdclip-tiny", "--lr", "5e-4", "--warmup", "5", "--log-every-n-steps", "1",
           "--logs", logs, "--name", "bench", "--save-frequency", "0", "--report-to", "", "--seed", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    rates = [float(x) for x in re.findall(r"([\d.]+)/s/gpu", r.stdout + r.stderr)]
    if not rates:
        print((r.stdout + r.stderr)[-3000:])
        raise RuntimeError("open_clip_train printed no throughput")
    return statistics.median(rates[3:] or rates)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--only", choices=["step", "loader"])
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.only != "loader":
        body, _ = psd_vs_clip(args)
        record("train-step", "Training: PSD step time vs CLIP", body)
    if args.only == "step":
        return
    ds = make_dataset(args)
    ours_sps, wait = ours(ds, args)
    compute_sps = compute_only(args)
    oc = open_clip_train(ds, args)
    lines = [f"| psdclip trainer, real shards ({args.workers} loader worker) | {ours_sps:.1f} |",
             f"| pure compute loop, in-memory tensors | {compute_sps:.1f} |"]
    if oc is not None:
        lines.append(f"| open_clip_train, same shards and model config | {oc:.1f} |")
    body = (f"tiny model, PSD loss, batch {args.batch_size}, fp32 on CPU, {args.steps} steps (median of the per-step "
            f"rates after 3 warm-up steps); dataset: {args.images} synthetic images built by the pipeline at 64 px.\n\n"
            f"| loop | samples/s |\n|---|---|\n" + "\n".join(lines) +
            f"\n\n**trainer / compute = {ours_sps / compute_sps:.3f}** (goal >= 0.90; median fraction of time "
            f"waiting for data {wait:.3f})  \n" +
            (f"**psdclip / open_clip_train = {ours_sps / oc:.3f}** (goal >= 1.0)\n" if oc else
             "open_clip_train not installed: `pip install 'open_clip_torch[training]'`\n"))
    record("train-throughput", "Training: trainer throughput vs compute and vs open_clip_train", body)


if __name__ == "__main__":
    main()
