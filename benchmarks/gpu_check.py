"""The one prepared GPU check (issue 32): every CUDA path that the CPU tests cannot run, in one command that fits
~9 minutes on one H200 and writes what it measures into $OUT (a file left only on the device is lost).

    (a) `--device cuda` and `--device auto`: rn-small, PSD with an EMA teacher, rho 0.5 and --accum 2, stopped
        half-way with a checkpoint and resumed to the end (steps continuous, losses finite, two starts recorded)
    (b) `--compile --accum 2`, recompiles logged (TORCH_LOGS=recompiles) and counted
    (c) two ranks on one GPU (torchrun, --dist-backend gloo), then a resume of that run with one rank
    (d) ViT-B-32 bf16: PSD vs CLIP step time, and samples/s of psdclip's trainer against open_clip_train on the same
        shards, like for like (benchmarks/train.py --only step / --only throughput; sections in BENCHMARKS.md)
    (e) the scaling-gpu recipe's training settings at batch 1024, with GPU memory, utilisation and /dev/shm sampled
        every 0.5 s (samples.csv)
    (f) the GPU-marked tests (pytest -m gpu)

Each step runs as its own process group with its own time limit, inside one overall deadline; a step that fails
or runs out of time is reported and the others still run. What comes back ($OUT, at most 8 files): gpu.log (every
command and its output), summary.json (each step's verdict and figures), BENCHMARKS.md (a copy with the sections
that (d) and (e) wrote), samples.csv, and from gpu.sh versions.txt and nvidia-smi.txt.

    bash benchmarks/gpu.sh               # on the device machine: installs .whl/ (benchmarks/gpu_wheels.sh), runs this
    python benchmarks/gpu_check.py --rehearse --out bench-out/rehearse   # the same steps on this CPU at toy sizes
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

# seconds per step on the GPU: 510 in all, which with gpu.sh's install (~30 s) fits the device's 600 s per call
BUDGET = {"prep": 55, "a": 110, "b": 85, "c": 45, "d": 140, "e": 55, "f": 20}
DEADLINE = sum(BUDGET.values())


# ---------------------------------------------------------------------------------------------------------------
# the wheel folder's stamp: which sources the psdclip wheel in .whl/ was built from
PACKAGES = ("core", "pipeline", "train", "index", "workflows")


def tree_sha() -> str:
    h = hashlib.sha256()
    paths = [os.path.join(ROOT, "pyproject.toml")]
    for pkg in PACKAGES:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, pkg)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            paths += [os.path.join(dirpath, f) for f in sorted(filenames) if not f.endswith(".pyc")]
    for p in paths:
        h.update(os.path.relpath(p, ROOT).encode() + b"\0")
        with open(p, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
class Ctx:
    def __init__(self, args):
        self.args, self.out, self.rehearse = args, os.path.abspath(args.out), args.rehearse
        self.work = os.path.abspath(args.work)
        self.log_path = os.path.join(self.out, "gpu.log")
        self.device = "cpu" if self.rehearse else "cuda"
        self.py = sys.executable
        # every section a step records goes into $OUT's copy of BENCHMARKS.md, which comes back
        self.benchmarks = os.path.join(self.out, "BENCHMARKS.md")
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "PSDCLIP_BENCHMARKS": self.benchmarks}
        if self.rehearse:
            self.env["OMP_NUM_THREADS"] = "1"
        r = self.rehearse
        # sizes: the device's, or the rehearsal's toy ones
        self.images, self.image_size = (600, 64) if r else (12000, 224)
        self.model_a, self.batch_a, self.workers = ("tiny", 32, 1) if r else ("rn-small", 128, 6)
        self.dataset = os.path.join(self.work, f"train-ds-{self.images}-{self.image_size}px")

    def log(self, text: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    def sh(self, cmd: list[str], timeout: float, env: dict | None = None, check: bool = True) -> str:
        """Run a command in its own process group (killed whole at the timeout), its output appended to gpu.log."""
        self.log(f"$ {' '.join(cmd)}")
        t = time.time()
        with open(self.log_path, "a") as f:
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                 env=env or self.env, start_new_session=True)
            out = []
            timer = threading.Timer(max(timeout, 1), lambda: _kill(p))
            timer.start()
            try:
                for line in p.stdout:
                    out.append(line)
                    f.write(line)
                    f.flush()
                p.wait()
            finally:
                timer.cancel()
        text = "".join(out)
        self.log(f"# exit {p.returncode} after {time.time() - t:.1f} s")
        if p.returncode in (-signal.SIGKILL, -signal.SIGTERM):
            raise TimeoutError(f"timed out after {timeout:.0f} s: {' '.join(cmd[:6])} ...")
        if check and p.returncode != 0:
            raise RuntimeError(f"exit {p.returncode}: {' '.join(cmd[:6])} ...: {text.strip().splitlines()[-1:]}")
        return text

    def train(self, run: str, *flags, timeout: float, prefix: list[str] | None = None, env=None) -> str:
        cmd = (prefix or [self.py, "-m"]) + ["psdclip.workflows.cli", "train", "--data", self.dataset, "--out", run,
                                             "--no-progress", *map(str, flags)]
        return self.sh(cmd, timeout, env=env)


def _kill(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def metrics(run: str) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def starts(run: str) -> int:
    with open(os.path.join(run, "config_history.jsonl")) as f:
        return sum(1 for line in f if line.strip())


def check_run(run: str, steps: int) -> dict:
    """A finished run's verdict: logged steps strictly increasing up to `steps`, finite losses, the last checkpoint."""
    rows = metrics(run)
    seq = [r["step"] for r in rows]
    assert seq == sorted(set(seq)), f"{run}: logged steps repeat or go back: {seq}"
    assert seq[-1] == steps, f"{run}: last logged step {seq[-1]}, expected {steps}"
    assert all(math.isfinite(r["loss"]) for r in rows), f"{run}: a non-finite loss"
    assert os.path.isfile(os.path.join(run, "checkpoints", f"step_{steps:06d}.pt")), f"{run}: no final checkpoint"
    late = rows[len(rows) // 2:]
    return {"steps": seq[-1], "final_loss": round(rows[-1]["loss"], 4),
            "samples_per_s": round(sorted(r["samples_per_s"] for r in late)[len(late) // 2], 1),
            "max_memory_gib": max((round(r["max_memory_gib"], 3) for r in rows if "max_memory_gib" in r), default=None)}


# ---------------------------------------------------------------------------------------------------------------
# the steps

def step_prep(ctx: Ctx, limit: float) -> dict:
    """The shards every step trains on: the synthetic source rendered and built through the pipeline (img2dataset
    downloads from a loopback server), at the model's own input size so that the loaders crop, not upsample."""
    import torch

    if not ctx.rehearse and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: this check runs on a GPU (--rehearse runs it on the CPU)")
    code = ("import sys, types; sys.path.insert(0, 'benchmarks'); from train import make_dataset; "
            f"print(make_dataset(types.SimpleNamespace(out={ctx.work!r}, images={ctx.images}, "
            f"image_size={ctx.image_size})))")
    t = time.time()
    ctx.sh([ctx.py, "-c", code], limit)
    info = json.load(open(os.path.join(ctx.dataset, "dataset.json")))
    return {"images": ctx.images, "image_size": ctx.image_size, "build_s": round(time.time() - t, 1),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "dataset_keys": sorted(info)[:8]}


def step_a(ctx: Ctx, limit: float) -> dict:
    """--device cuda and auto: PSD + EMA + rho 0.5 + accum 2, stopped half-way and resumed; then --precision amp."""
    steps = 8 if ctx.rehearse else 16
    flags = ["--model", ctx.model_a, "--loss", "psd", "--ema-teacher", "--ema-decay", "0.99", "--rho-start", "0.5",
             "--rho-end", "0.5", "--alpha-start", "0.2", "--accum", "2", "--batch-size", ctx.batch_a, "--steps", steps,
             "--checkpoint-every", steps // 4, "--log-every", 2, "--workers", ctx.workers, "--warmup", 2]
    out, t0 = {}, time.time()
    for spec in ("cuda", "auto") if not ctx.rehearse else ("cpu", "auto"):
        run = os.path.join(ctx.work, f"a-{spec}")
        shutil.rmtree(run, ignore_errors=True)
        left = limit - (time.time() - t0)
        ctx.train(run, *flags, "--device", spec, "--stop-after", steps // 2, timeout=left / (2.5 if spec != "auto" else 1.5))
        assert metrics(run)[-1]["step"] == steps // 2, f"{run}: --stop-after did not stop at {steps // 2}"
        text = ctx.train(run, *flags, "--device", spec, timeout=limit - (time.time() - t0))
        assert starts(run) == 2, f"{run}: expected two starts in config_history.jsonl"
        assert f"(step {steps // 2})" in text, f"{run}: the second start did not resume from step {steps // 2}"
        out[spec] = check_run(run, steps)
    if not ctx.rehearse:  # fp16 with loss scaling (--precision amp): CUDA only
        run = os.path.join(ctx.work, "a-amp")
        shutil.rmtree(run, ignore_errors=True)
        ctx.train(run, *flags, "--device", "cuda", "--precision", "amp", timeout=limit - (time.time() - t0))
        rows = metrics(run)
        assert all("loss_scale" in r for r in rows), f"{run}: no loss_scale in metrics.jsonl"
        out["amp"] = {**check_run(run, steps), "loss_scale": rows[-1]["loss_scale"],
                      "skipped_steps": sum(r["skipped_steps"] for r in rows)}
    return out


def step_b(ctx: Ctx, limit: float) -> dict:
    """--compile --accum 2, recompiles logged and counted."""
    steps = 6 if ctx.rehearse else 16
    run = os.path.join(ctx.work, "b-compile")
    shutil.rmtree(run, ignore_errors=True)
    t = time.time()
    text = ctx.train(run, "--model", ctx.model_a, "--loss", "psd", "--compile", "--accum", "2", "--batch-size",
                     ctx.batch_a, "--steps", steps, "--checkpoint-every", steps, "--log-every", 1, "--workers",
                     ctx.workers, "--device", ctx.device, timeout=limit,
                     env={**ctx.env, "TORCH_LOGS": "recompiles"})
    recompiles = [line for line in text.splitlines() if "Recompiling function" in line]
    rows = metrics(run)
    return {**check_run(run, steps), "wall_s": round(time.time() - t, 1), "recompiles": len(recompiles),
            "recompile_reasons": sorted({line.split("[__recompiles]")[-1].strip(" -")[:120] for line in text.splitlines()
                                         if "[__recompiles]" in line and "    - " in line})[:5],
            "first_step_rate": round(rows[0]["samples_per_s"], 1)}


def step_c(ctx: Ctx, limit: float) -> dict:
    """Two ranks sharing one GPU over gloo with PSD's embedding-bank teacher (ids and features gathered on CUDA,
    the bank on each rank's disk), then the same run resumed with one rank (from rank 0's bank copy)."""
    steps = 6 if ctx.rehearse else 12
    run = os.path.join(ctx.work, "c-two-ranks")
    shutil.rmtree(run, ignore_errors=True)
    device = "cpu" if ctx.rehearse else "cuda:0"
    flags = ["--model", ctx.model_a, "--loss", "psd", "--batch-size", ctx.batch_a, "--steps", steps,
             "--checkpoint-every", steps // 2, "--log-every", 1, "--workers", 1, "--device", device,
             "--dist-backend", "gloo", "--bank-teacher", "--alpha-start", "0.5"]
    torchrun = [ctx.py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    t0 = time.time()
    ctx.train(run, *flags, "--stop-after", steps // 2, timeout=limit * 0.6, prefix=torchrun)
    import torch

    state = torch.load(os.path.join(run, "checkpoints", f"step_{steps // 2:06d}.pt"), weights_only=True,
                       map_location="cpu")
    assert state["data"]["world_size"] == 2, "the two-rank checkpoint does not record world size 2"
    text = ctx.train(run, *flags, timeout=limit - (time.time() - t0))
    return {**check_run(run, steps), "one_rank_resume_warned": "ranks or workers changed" in text}


def step_d(ctx: Ctx, limit: float) -> dict:
    """ViT-B-32 bf16: PSD vs CLIP step time (in-memory tensors), then the trainer vs open_clip_train."""
    bench = [ctx.py, os.path.join(HERE, "train.py"), "--device", ctx.device, "--out", ctx.work]
    t0 = time.time()
    if ctx.rehearse:
        step = bench + ["--only", "step", "--step-model", "tiny", "--batch-size", "16", "--rounds", "1"]
        thr = bench + ["--only", "throughput", "--model", "tiny", "--images", str(ctx.images), "--image-size",
                       str(ctx.image_size), "--steps", "6", "--batch-size", "32", "--workers", "1"]
    else:
        step = bench + ["--only", "step", "--step-model", "ViT-B-32", "--batch-size", "256", "--rounds", "4"]
        thr = bench + ["--only", "throughput", "--model", "ViT-B-32", "--images", str(ctx.images), "--image-size",
                       str(ctx.image_size), "--steps", "48", "--batch-size", "256", "--workers", "12"]
    out, kind = {}, "" if ctx.rehearse else "-cuda"
    try:
        ctx.sh(step, min(60, limit * 0.35))
        out["step"] = figures(ctx.benchmarks, "train-step" + kind)
    except (RuntimeError, TimeoutError) as e:  # the throughput comparison still runs
        out["step_error"] = str(e)
    ctx.sh(thr, limit - (time.time() - t0))
    out["throughput"] = figures(ctx.benchmarks, "train-throughput" + kind)
    return out


def figures(path: str, name: str) -> list[str]:
    """The bold lines (the verdicts) of one section of a BENCHMARKS.md."""
    text = open(path, encoding="utf-8").read()
    start, end = text.find(f"<!-- {name}:start -->"), text.find(f"<!-- {name}:end -->")
    return [line.strip() for line in text[start:end].splitlines() if "**" in line] if start >= 0 else []


def step_e(ctx: Ctx, limit: float) -> dict:
    """The scaling-gpu recipe's training settings at its batch (1024), sampled: GPU memory, utilisation, /dev/shm."""
    from psdclip.workflows.recipe import load_recipe

    train = dict(load_recipe("scaling-gpu")["train"])
    batch = 64 if ctx.rehearse else int(train["batch_size"])
    model = "tiny" if ctx.rehearse else train["model"]
    workers = 1 if ctx.rehearse else int(train["workers"])
    steps = 4 if ctx.rehearse else 14
    run = os.path.join(ctx.work, "e-batch1024")
    shutil.rmtree(run, ignore_errors=True)
    path = os.path.join(ctx.out, "samples.csv")
    stop = threading.Event()
    sampler = threading.Thread(target=_sample, args=(path, stop), daemon=True)
    sampler.start()
    try:
        ctx.train(run, "--model", model, "--loss", "psd", "--batch-size", batch, "--lr", train.get("lr", 1e-3),
                  "--precision", "fp32" if ctx.rehearse else train.get("precision", "bf16"), "--workers", workers,
                  "--steps", steps, "--log-every", 1, "--checkpoint-every", steps, "--warmup", 2,
                  "--device", ctx.device, timeout=limit)
    finally:
        stop.set()
        sampler.join(5)
    rows = list(csv.DictReader(open(path)))

    def peak(col):
        vals = [float(r[col]) for r in rows if r[col] not in ("", None)]
        return max(vals) if vals else None

    result = {**check_run(run, steps), "batch": batch, "model": model, "workers": workers, "samples": len(rows),
              "peak_gpu_mem_mib": peak("gpu_mem_mib"), "peak_util_pct": peak("gpu_util_pct"),
              "peak_shm_mib": peak("shm_mib")}
    from _record import record

    body = (f"The scaling-gpu recipe's training settings ({model}, batch {batch}, {workers} loader workers, "
            f"{train.get('precision', 'bf16')}, PSD), {steps} steps on the pipeline's {ctx.images} images at "
            f"{ctx.image_size} px, sampled every 0.5 s by benchmarks/gpu_check.py (e).\n\n"
            f"| figure | value |\n|---|---|\n| samples/s (median, second half) | {result['samples_per_s']} |\n"
            f"| peak torch memory (GiB) | {result['max_memory_gib']} |\n"
            f"| peak GPU memory, nvidia-smi (MiB) | {result['peak_gpu_mem_mib']} |\n"
            f"| peak GPU utilisation (%) | {result['peak_util_pct']} |\n"
            f"| peak /dev/shm used (MiB) | {result['peak_shm_mib']} |\n")
    os.environ["PSDCLIP_BENCHMARKS"] = ctx.benchmarks
    record("train-batch1024-" + ("cpu-rehearsal" if ctx.rehearse else "cuda"),
           f"Training: the scaling-gpu recipe at batch {batch} ({ctx.device})", body)
    return result


def _sample(path: str, stop: threading.Event) -> None:
    smi = shutil.which("nvidia-smi")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t", "gpu_mem_mib", "gpu_util_pct", "shm_mib"])
        t0 = time.time()
        while not stop.is_set():
            mem = util = ""
            if smi:
                try:
                    r = subprocess.run([smi, "--query-gpu=memory.used,utilization.gpu", "--format=csv,noheader,nounits"],
                                       capture_output=True, text=True, timeout=5)
                    mem, util = [x.strip() for x in r.stdout.splitlines()[0].split(",")[:2]]
                except (subprocess.SubprocessError, IndexError, ValueError):
                    pass
            try:
                shm = shutil.disk_usage("/dev/shm").used / 2**20
            except OSError:
                shm = ""
            w.writerow([round(time.time() - t0, 2), mem, util, round(shm, 1) if shm != "" else ""])
            f.flush()
            stop.wait(0.5)


def step_f(ctx: Ctx, limit: float) -> dict:
    """The GPU-marked tests."""
    text = ctx.sh([ctx.py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/train/test_gpu_paths.py",
                   "-o", "addopts=--import-mode=importlib"], limit, check=False)
    tail = [line for line in text.splitlines() if " passed" in line or " failed" in line or " skipped" in line]
    return {"pytest": tail[-1:] or text.strip().splitlines()[-1:]}


STEPS = {"prep": step_prep, "a": step_a, "b": step_b, "c": step_c, "d": step_d, "e": step_e, "f": step_f}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench-out/gpu",
                    help="where gpu.log, summary.json, samples.csv and BENCHMARKS.md go (default: $OUT)")
    ap.add_argument("--work", default=None, help="scratch folder: datasets and runs (default: a temp folder)")
    ap.add_argument("--rehearse", action="store_true", help="run every step on the CPU at toy sizes")
    ap.add_argument("--only", default="", help="comma-separated steps (prep always runs): a,b,c,d,e,f")
    ap.add_argument("--check-wheels", action="store_true",
                    help="only check that .whl/ holds a psdclip wheel built from these sources, and exit")
    args = ap.parse_args()
    if args.check_wheels:
        stamp = os.path.join(ROOT, ".whl", "psdclip-tree.sha256")
        if not os.path.isfile(stamp):
            sys.exit("psdclip: error: .whl/ has no psdclip wheel: run `bash benchmarks/gpu_wheels.sh` first")
        if open(stamp).read().strip() != tree_sha():
            sys.exit("psdclip: error: the psdclip wheel in .whl/ was built from other sources: rerun "
                     "`bash benchmarks/gpu_wheels.sh`")
        return
    args.work = args.work or os.path.join("/tmp", "psdclip-gpu-rehearse" if args.rehearse else "psdclip-gpu")
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    ctx = Ctx(args)
    if not os.path.isfile(ctx.benchmarks):  # $OUT starts empty on the device; a rerun here keeps what it recorded
        shutil.copy(os.path.join(ROOT, "BENCHMARKS.md"), ctx.benchmarks)
    chosen = ["prep"] + [s for s in (args.only.split(",") if args.only else "abcdef") if s in STEPS and s != "prep"]
    summary = {"rehearse": args.rehearse, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "steps": {}}
    scale = 1.0 if not args.rehearse else 4.0  # two CPU cores are slower than an H200 at the toy sizes too
    deadline = time.time() + DEADLINE * scale
    for name in chosen:
        left = deadline - time.time()
        limit = min(BUDGET[name] * scale, left)
        t = time.time()
        if limit < 5:
            summary["steps"][name] = {"ok": False, "error": "no time left in the overall deadline"}
        else:
            print(f"gpu_check: step {name} ({limit:.0f} s at most)", flush=True)
            try:
                res = STEPS[name](ctx, limit)
                summary["steps"][name] = {"ok": True, "seconds": round(time.time() - t, 1), **res}
            except Exception as e:  # noqa: BLE001  (a step's failure is reported; the next step still runs)
                summary["steps"][name] = {"ok": False, "seconds": round(time.time() - t, 1),
                                          "error": f"{type(e).__name__}: {e}"}
                if name == "prep":
                    break
        print(f"gpu_check: step {name}: {json.dumps(summary['steps'][name])[:400]}", flush=True)
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    ok = all(s.get("ok") for s in summary["steps"].values())
    print(f"gpu_check: {'all steps passed' if ok else 'some steps failed'}; see {args.out}/summary.json", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
