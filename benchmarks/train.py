"""Training benchmarks, each a side-by-side ratio measured in one run, recorded in BENCHMARKS.md.

1. PSD step time / CLIP step time for each PSD setting: same model, batch 128, in-memory tensors. Goal <= 1.02
   (the EMA teacher, which runs a second model's forward pass, is reported beside it), the embedding-bank teacher
   included (its lookup and write on a memory-mapped bank of 200,000 samples; goal <= 1.02) with its bytes per
   sample, and the study's controls (label smoothing, oracle targets).
2. Our trainer reading real shards / a pure compute loop on in-memory tensors, samples/s. Goal >= 0.90.
3. Our trainer / open_clip's own loop (open_clip_train) on the same model config, shards and batch, like for like:
   the same loss (--loss, default clip), gradient clip, loader workers, transform and number of steps; on CUDA
   both bf16 with TF32 and cudnn.benchmark. samples/s, goal >= 1.0. (Needs `pip install
   'open_clip_torch[training]'`; skipped if absent.)
4. Presets: samples/s of each model preset (tiny, rn-small) in the pure compute loop and in our trainer on
   real shards (`--only presets`).
5. `--accum 4` / `--accum 1` at the same global batch, samples/s (`--only accum`).

    python benchmarks/train.py [--images 3000] [--steps 20] [--batch-size 128] [--model tiny] [--device cpu]
                               [--loss clip|psd] [--image-size 64] [--grad-clip 1.0]
                               [--only step|loader|presets|accum|throughput] [--out bench-out]
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
from psdclip.train.objectives import make_loss  # noqa: E402
from psdclip.train.loading import resolve_device  # noqa: E402
from psdclip.train.schedule import param_groups  # noqa: E402
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
    """Step time of every PSD setting of the study against CLIP, same model and batch, in-memory tensors."""
    from psdclip.train.loop import forward_backward
    from psdclip.train.teacher import model_teacher

    torch.manual_seed(0)
    device = torch.device(args.device)
    model, _, _, tok = build_model(args.step_model, device)
    px = _image_size(model)
    images = torch.randn(args.batch_size, 3, px, px, device=device)
    texts = tok(["a photo of two small red circles on a white background"] * args.batch_size).to(device)
    opt = torch.optim.AdamW(param_groups(model, 0.2), lr=1e-4)
    settings = {"clip": {"loss": "clip"}, "psd (default)": {"loss": "psd"},
                "psd T=2": {"loss": "psd", "teacher_temperature": 2.0},
                "psd rho=0.5": {"loss": "psd", "rho_start": 0.5, "rho_end": 0.5},
                "psd rho=0.5 alpha_max=0.8": {"loss": "psd", "rho_start": 0.5, "rho_end": 0.5, "alpha_max": 0.8},
                "psd EMA teacher": {"loss": "psd", "ema_teacher": True},
                "psd snapshot teacher": {"loss": "psd", "snapshot_every": 100},
                f"psd external teacher ({args.distill_model})": {"loss": "psd"},
                "psd bank teacher": {"loss": "psd", "bank_teacher": True},
                "clip label smoothing 0.1": {"loss": "clip", "label_smoothing": 0.1},
                "psd oracle targets": {"loss": "psd", "oracle_targets": "x.parquet"}}
    external = f"psd external teacher ({args.distill_model})"
    own_teacher = ("psd EMA teacher", "psd snapshot teacher", external)  # a second forward pass, by design
    import copy

    from psdclip.train.teacher import wrap_teacher

    ema = copy.deepcopy(model).requires_grad_(False)
    outside = wrap_teacher(build_model(args.distill_model, device)[0], model).to(device)
    import tempfile

    from psdclip.train.bank import BankTeacher, EmbeddingBank
    from psdclip.train.models import model_config
    from psdclip.train.oracle import oracle_targets

    folder = tempfile.mkdtemp(prefix="psdclip-bank-bench-")
    dim = model_config(args.step_model)["embed_dim"]
    bank = EmbeddingBank(folder, 0, ids=200_000, dim=dim, made_for={})
    bank.start(0)
    gen = torch.Generator().manual_seed(0)
    for lo in range(0, 200_000, 20_000):  # every sample seen once: a full teacher for every row
        rows = torch.nn.functional.normalize(torch.randn(20_000, 2, dim, generator=gen), dim=-1)
        bank.write(torch.arange(lo, lo + 20_000), rows[:, 0], rows[:, 1])
    codes = torch.randint(0, 36, (args.batch_size, 2), generator=gen).to(device)

    def run(name, n):
        cfg = TrainConfig(data="x", out="y", steps=100, alpha_start=0.5, **settings[name])
        loss_fn = make_loss(cfg, 0, 1)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.cuda):
                frozen = ema if (cfg.ema_teacher or cfg.snapshot_every) else outside if name == external else None
                teacher, keep = None if frozen is None else model_teacher(frozen, loss_fn), None
                if cfg.bank_teacher:  # a new batch of sample ids each step, as a shuffled epoch gives
                    ids = torch.randperm(200_000, generator=gen)[:args.batch_size]
                    teacher, keep = BankTeacher(bank, "x").for_step(model, loss_fn, [], ids, 1, device)
                elif cfg.oracle_targets:
                    teacher = lambda _: {"teacher_targets": oracle_targets(codes, codes)}  # noqa: E731
                forward_backward(model, model, loss_fn, [(images, texts)], step=10, teacher=teacher, on_features=keep)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if args.cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return times

    run("clip", 2)  # warm-up
    res = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name in settings:
            res[name] += run(name, 3)
    med = {k: statistics.median(v) for k, v in res.items()}
    shutil.rmtree(folder, ignore_errors=True)
    ratio = max(med[k] for k in settings if k.startswith("psd") and k not in own_teacher) / med["clip"]
    rows = "".join(f"| {k} | {v:.4f} | {v / med['clip']:.3f} |\n" for k, v in med.items())
    body = (f"{args.step_model}, batch {args.batch_size}, {args.device} "
            f"{'bf16' if args.cuda else 'fp32'}, the trainer's step (train.loop.forward_backward + "
            f"AdamW) on in-memory tensors, {len(res['clip'])} steps each, alternated in blocks of 3.\n\n"
            f"| loss | median step (s) | / CLIP |\n|---|---|---|\n{rows}\n"
            f"**slowest PSD setting without a second forward pass (same pass, bank, oracle) / CLIP step time = "
            f"{ratio:.3f}** (goal <= 1.02; the bank teacher alone: {med['psd bank teacher'] / med['clip']:.3f}, "
            f"{bank.bytes_per_sample} bytes a sample (fp16 image and text rows of {dim}); the EMA or snapshot "
            f"teacher adds the teacher's forward pass: "
            f"{max(med[k] for k in own_teacher[:2]) / med['clip']:.3f}; the external teacher {args.distill_model} "
            f"(--distill-model) adds its own: {med[external] / med['clip']:.3f})\n")
    return body, ratio


def make_dataset(args) -> str:
    ds = os.path.join(args.out, f"train-ds-{args.images}-{args.image_size}px")
    if os.path.isfile(os.path.join(ds, "dataset.json")):
        return ds
    src = os.path.join(args.out, f"train-synth-{args.images}")
    if not os.path.isfile(os.path.join(src, "synth.json")):
        generate(SynthConfig(out=src, n=args.images, seed=0, heldout=0, image_size=max(96, args.image_size)),
                 progress=False)
    with serving(src) as base:
        build(BuildConfig(inputs=[write_url_list(src, base, "urls-train-bench.csv")], out=ds,
                          image_size=args.image_size,
                          shard_size=500, progress=False))
    return ds


def ours(ds, args, name: str | None = None, accum: int = 1, threads: int = 0) -> float:
    from psdclip.train.loop import train

    run = os.path.join(args.out, "train-ours")
    shutil.rmtree(run, ignore_errors=True)
    if args.cuda:
        torch.cuda.reset_peak_memory_stats()
    train(TrainConfig(data=ds, out=run, model=name or args.model, loss=args.loss, steps=args.steps,
                      grad_clip=args.grad_clip,
                      batch_size=args.batch_size, workers=args.workers, log_every=1, checkpoint_every=10_000, warmup=5,
                      progress=False, shuffle_buffer=500, device=args.device, accum=accum,
                      threads=threads))
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.cuda else float("nan")
    return (statistics.median(r["samples_per_s"] for r in rows[3:]),
            statistics.median(r["data_wait_frac"] for r in rows[3:]), peak)


def _image_size(model) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def compute_only(args, name: str | None = None) -> float:
    """The model's own speed: full optimizer steps on in-memory tensors (channels-last, as the trainer runs)."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    model, _, _, tok = build_model(name or args.model, device)
    model = model.to(memory_format=torch.channels_last)
    px = _image_size(model)
    images = torch.randn(args.batch_size, 3, px, px, device=device).contiguous(memory_format=torch.channels_last)
    texts = tok(["a photo of two small red circles on a white background"] * args.batch_size).to(device)
    opt = torch.optim.AdamW(param_groups(model, 0.2), lr=1e-4)
    loss = make_loss(TrainConfig(data="x", out="y", loss=args.loss, steps=args.steps), 0, 1)
    bf16 = args.cuda
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
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
           "--batch-size", str(args.batch_size), "--workers", str(args.workers),
           "--precision", "amp_bfloat16" if args.cuda else "fp32", "--grad-clip-norm", str(args.grad_clip),
           "--epochs", "1", "--model", {"tiny": "psdclip-tiny", "rn-small": "psdclip-rn-small"}.get(args.model, args.model), "--lr", "5e-4", "--warmup", "5", "--log-every-n-steps", "1",
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
    ap.add_argument("--only", choices=["step", "loader", "presets", "accum", "throughput"],
                    help="throughput: the trainer vs open_clip alone (without it, the step comparison reruns too "
                         "and its section is rewritten with --step-model)")
    ap.add_argument("--model", default="tiny", help="model of the throughput comparison")
    ap.add_argument("--step-model", default="tiny", help="model of the PSD vs CLIP step-time comparison")
    ap.add_argument("--distill-model", default="rn-small",
                    help="the external teacher (--distill-model) of the step-time comparison")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on cuda)")
    ap.add_argument("--loss", default="clip", choices=["clip", "psd"],
                    help="loss of the throughput, preset and accum runs (clip: what open_clip_train runs)")
    ap.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip, the same for both trainers")
    ap.add_argument("--image-size", type=int, default=64,
                    help="pixels the pipeline stores; at the model's own size (224 for ViT-B-32) the loaders only "
                         "crop, instead of upsampling every image")
    args = ap.parse_args()
    args.device = str(resolve_device(args.device))  # `cuda` is cuda:0 here: every check below reads .cuda
    args.cuda = args.device.startswith("cuda")
    kind = "cuda" if args.cuda else args.device  # the section names of BENCHMARKS.md
    os.makedirs(args.out, exist_ok=True)
    if args.only == "accum":
        ds = make_dataset(args)
        (one, _, peak1), (four, _, peak4) = ours(ds, args), ours(ds, args, accum=4)
        body = (f"{args.model} model, {args.loss} loss, global batch {args.batch_size}, {args.device}, {args.steps} steps (median "
                f"after 3 warm-up steps), {args.workers} loader worker(s).\n\n| --accum | samples/s |\n|---|---|\n"
                f"| 1 | {one:.1f} |\n| 4 (feature cache: one extra forward without gradients) | {four:.1f} |\n\n"
                + (f"Peak GPU memory: {peak1:.2f} GiB (accum 1), {peak4:.2f} GiB (accum 4).\n\n" if args.cuda
                   else "") +
                f"**accum 4 / accum 1 = {four / one:.3f}** (expected ~0.75)\n")
        record(f"train-accum-{kind}", "Training: feature-cache accumulation, samples/s", body)
        return
    if args.only == "presets":
        ds = make_dataset(args)
        rows, left = [], max(1, (os.cpu_count() or 1) - args.workers)  # the cores the loader workers leave
        for name in ("tiny", "rn-small"):
            rows.append(f"| {name} | {compute_only(args, name):.0f} | {ours(ds, args, name)[0]:.0f} | "
                        f"{ours(ds, args, name, threads=left)[0]:.0f} |")
        body = (f"batch {args.batch_size}, {args.loss} loss, {args.device}{' bf16' if args.cuda else ' fp32'}, "
                f"channels-last, {args.steps} steps (median after 3 warm-up steps); trainer: {args.workers} loader "
                f"worker(s) on {args.images} synthetic images built by the pipeline at {args.image_size} px.\n\n"
                f"| preset | compute loop samples/s | trainer on real shards samples/s | the same, --threads {left} |\n"
                "|---|---|---|---|\n" +
                "\n".join(rows) + "\n")
        record(f"train-presets-{kind}", f"Training: samples/s of the model presets ({args.device})", body)
        return
    if args.only not in ("loader", "throughput"):
        body, _ = psd_vs_clip(args)
        record("train-step" + ("" if kind == "cpu" else f"-{kind}"), "Training: PSD step time vs CLIP "
               f"({args.device})", body)
    if args.only == "step":
        return
    if args.workers > 1 and args.steps % args.workers:
        # open_clip_train runs floor(batches / workers) * workers steps of a webdataset epoch: give both the same
        args.steps += args.workers - args.steps % args.workers
        print(f"--steps rounded up to {args.steps}, a multiple of --workers, so that open_clip_train runs as many")
    ds = make_dataset(args)
    ours_sps, wait, peak = ours(ds, args)
    compute_sps = compute_only(args)
    oc = open_clip_train(ds, args)
    lines = [f"| psdclip trainer, real shards ({args.workers} loader worker) | {ours_sps:.1f} |",
             f"| pure compute loop, in-memory tensors | {compute_sps:.1f} |"]
    if oc is not None:
        lines.append(f"| open_clip_train, same shards and model config (webdataset's end-of-shard "
                     f"marker off, see _openclip_train.py) | {oc:.1f} |")
    body = (f"{args.model} model, {args.loss} loss, batch {args.batch_size}, {args.device}"
            f"{' bf16, TF32 and cudnn.benchmark in both trainers' if args.cuda else ' fp32'}, gradient-norm clip "
            f"{args.grad_clip} in both, {args.workers} loader worker(s) each, the same open_clip train transform, "
            f"{args.steps} steps each (median of the per-step rates after 3 warm-up steps); dataset: {args.images} "
            f"synthetic images built by the pipeline at {args.image_size} px.\n\n"
            f"| loop | samples/s |\n|---|---|\n" + "\n".join(lines) +
            f"\n\n**trainer / compute = {ours_sps / compute_sps:.3f}** (goal >= 0.90; median fraction of time "
            f"waiting for data {wait:.3f})  \n" +
            (f"**psdclip / open_clip_train = {ours_sps / oc:.3f}** (goal >= 1.0)\n" if oc else
             "open_clip_train not installed: `pip install 'open_clip_torch[training]'`\n"))
    if args.cuda:
        body += f"\nPeak GPU memory of the psdclip trainer: {peak:.2f} GiB.\n"
    record("train-throughput" + ("" if kind == "cpu" else f"-{kind}"),
           f"Training: trainer throughput vs compute and vs open_clip_train ({args.device})", body)


if __name__ == "__main__":
    main()
