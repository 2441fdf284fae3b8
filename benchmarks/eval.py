"""Evaluation speed: the tiny model on ~2,000 synthetic images (334 held-out scenes x 6 renderings), all
four metric families (zero-shot, linear probe, retrieval, robustness), cold (no feature cache), wall time
of the whole `psdclip eval` command. Goal: under a minute on this machine. Recorded in BENCHMARKS.md.

    python benchmarks/eval.py [--scenes 334] [--out bench-out]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _record import record  # noqa: E402

import torch  # noqa: E402

from psdclip.pipeline.config import SynthConfig  # noqa: E402
from psdclip.pipeline.synth import SHIFTS, generate  # noqa: E402
from psdclip.train import checkpoint as ckpt  # noqa: E402
from psdclip.train.models import build_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scenes", type=int, default=334)
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    src = os.path.join(args.out, f"eval-synth-{args.scenes}")
    if not os.path.isfile(os.path.join(src, "synth.json")):
        generate(SynthConfig(out=src, n=10, seed=1, heldout=args.scenes, image_size=96), progress=False)
    run = os.path.join(args.out, "eval-run")
    shutil.rmtree(run, ignore_errors=True)
    model, *_ = build_model("tiny")
    ckpt.save(os.path.join(run, "checkpoints"), 1, {"model": model.state_dict(), "step": 1, "model_arch": "psdclip-tiny",
                                                    "loss": "psd"}, keep=1)
    exe = os.path.join(os.path.dirname(sys.executable), "psdclip")
    times = []
    for _ in range(2):
        shutil.rmtree(os.path.join(run, "eval"), ignore_errors=True)
        t = time.time()
        subprocess.run([exe, "eval", run, "--suite", f"synthetic:{src}"], check=True, capture_output=True)
        times.append(time.time() - t)
    n = args.scenes * len(SHIFTS)
    body = (f"`psdclip eval RUN --suite synthetic:DIR` on {n:,} images ({args.scenes} held-out scenes x {len(SHIFTS)} "
            f"renderings: base, sketch, texture, colorshift, blur, noise), tiny model, CPU, cold feature cache, "
            f"whole command (process start, model load, encoding, zero-shot for shape and colour, linear probe with "
            f"C chosen on a validation split, retrieval both ways, robustness).\n\n"
            f"| run | seconds |\n|---|---|\n" + "\n".join(f"| {i + 1} | {t:.1f} |" for i, t in enumerate(times)) +
            f"\n\n**{min(times):.1f} s** (goal: under 60 s)\n")
    record("eval-speed", "Evaluation: 2,000 synthetic images, all metric families", body)


if __name__ == "__main__":
    main()
