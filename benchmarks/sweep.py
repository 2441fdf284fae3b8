"""CLIP vs PSD on noisy synthetic captions: runs `psdclip sweep scaling-quick` (resumable: finished runs are
reused) and records its table, fits and per-size PSD - CLIP differences in BENCHMARKS.md.

    python benchmarks/sweep.py [--recipe scaling-quick] [--out bench-out/sweep-quick]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _record import record  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipe", default="scaling-quick")
    ap.add_argument("--out", default="bench-out/sweep-quick")
    args = ap.parse_args()
    exe = os.path.join(os.path.dirname(sys.executable), "psdclip")
    subprocess.run([exe, "sweep", args.recipe, "--out", args.out], check=True, capture_output=True)
    table = pd.read_csv(os.path.join(args.out, "results.csv"))
    metrics = ["zeroshot_shape_base.top1", "zeroshot_colour_base.top1", "retrieval.t2i_R@1", "retrieval.i2t_R@1",
               "linear_probe_shape.accuracy"]
    lines = ["| N | " + " | ".join(f"PSD − CLIP {m}" for m in metrics) + " |", "|---|" + "---|" * len(metrics)]
    for n, grp in table.groupby("N"):
        cells = []
        for m in metrics:
            c = grp[grp["method"] == "clip"].sort_values("seed")[m].to_numpy()
            p = grp[grp["method"] == "psd"].sort_values("seed")[m].to_numpy()
            d = p - c  # paired by seed
            half = 1.96 * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
            cells.append(f"{d.mean():+.3f} ± {half:.3f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    results = open(os.path.join(args.out, "results.md")).read()
    body = (f"`psdclip sweep {args.recipe}`: 20,000 synthetic pairs (20% mismatched, 10% shared, 5% low-information, "
            f"30% partial captions), nested subsets of ~200, ~2,000 and ~20,000, CLIP and PSD (alpha 0 -> 0.5 "
            f"linear, rho 1, teacher temperature 1), seeds 0 and 1, 9,600 samples seen per run (150 steps x 64, "
            f"tiny model, CPU); evaluated on 300 held-out scenes. Mean ± 95% CI over seeds:\n\n{results}\n\n"
            f"PSD − CLIP, paired by seed (mean ± 95% CI over the two seeds):\n\n" + "\n".join(lines) +
            "\n\n**Result: at this compute PSD does not beat CLIP; every difference is within noise.** Both models "
            "learn colour (zero-shot colour 0.6–0.8 against a chance of 0.17) and little else: shape stays at "
            "chance, so the fits for shape are not meaningful. 150 CPU steps per run is far from the regime the "
            "paper reports gains in (millions of samples, many epochs); the PSD settings tried here are only the "
            "provisional defaults (alpha_max 0.5, rho 1, T 1).\n\n"
            "**Why PSD and CLIP come out alike here, beyond the small compute:** with the teacher taken from the same "
            "logits at temperature 1, a distilled row's gradient is exactly (1 − alpha) times its CLIP gradient "
            "(softmax − ((1 − alpha)·onehot + alpha·softmax) = (1 − alpha)(softmax − onehot)); with rho = 1 every "
            "row is scaled alike and Adam undoes the scaling, so PSD trains like CLIP (the ~200-sample runs ended "
            "with weights within 1e-5 of each other). `tests/train/test_losses.py` pins this down. A teacher "
            "temperature other than 1, rho < 1 or the EMA teacher is what makes PSD differ; the next sweep has to "
            "vary those. `scaling-demo.yaml` is the larger sweep (100k pairs, 3 seeds, 64,000 samples seen per "
            "run) still to be run.\n")
    record("sweep-clip-vs-psd", "CLIP vs PSD: the demo-scale sweep", body)


if __name__ == "__main__":
    main()
