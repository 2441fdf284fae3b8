"""CLIP vs PSD on noisy synthetic captions: runs `psdclip sweep RECIPE` (resumable: finished runs are reused)
and records its table, fits and the paired difference of every PSD setting from CLIP in BENCHMARKS.md.

    python benchmarks/sweep.py [--recipe scaling-demo] [--out bench-out/sweep-demo]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _record import record  # noqa: E402

from psdclip.workflows.recipe import load_recipe  # noqa: E402
from psdclip.workflows.sweep import ci_half  # noqa: E402


def paired_differences(table: pd.DataFrame, metrics: list[str], base: str = "clip") -> tuple[list[str], list]:
    """Markdown rows of (method - base) per N and metric, paired by seed, mean ± 95% CI (Student t) over seeds;
    and the (method, N, metric, mean, half) cells whose interval excludes 0 (a zero-width interval, from seeds
    that happen to agree, does not count)."""
    lines = ["| N | method | " + " | ".join(f"Δ {m}" for m in metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    clear = []
    for n, grp in table.groupby("N"):
        b = grp[grp["method"] == base].set_index("seed")
        for method in [m for m in grp["method"].unique() if m != base]:
            o = grp[grp["method"] == method].set_index("seed")
            seeds = sorted(set(b.index) & set(o.index))
            cells = []
            for m in metrics:
                d = o.loc[seeds, m].to_numpy(float) - b.loc[seeds, m].to_numpy(float)
                half = ci_half(d)
                cells.append(f"{d.mean():+.3f} ± {half:.3f}")
                if len(d) > 1 and half > 1e-9 and abs(d.mean()) > half:
                    clear.append((method, n, m, d.mean(), half))
            lines.append(f"| {n} | {method} | " + " | ".join(cells) + " |")
    return lines, clear


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipe", default="scaling-demo")
    ap.add_argument("--out", default="bench-out/sweep-demo")
    args = ap.parse_args()
    exe = os.path.join(os.path.dirname(sys.executable), "psdclip")
    subprocess.run([exe, "sweep", args.recipe, "--out", args.out], check=True)
    recipe = load_recipe(args.recipe)
    sw = recipe["sweep"]
    table = pd.read_csv(os.path.join(args.out, "results.csv"))
    metrics = [m for m in sw["metrics"] if m in table]
    lines, clear = paired_differences(table, metrics)
    settings = "; ".join(f"**{k}**: " + ", ".join(f"{a}={b}" for a, b in (v or {}).items())
                         for k, v in sw["methods"].items())
    per_run = sw["compute"]
    verdict = ("No PSD setting differs from CLIP beyond the 95% interval over seeds on any metric or size."
               if not clear else "Differences from CLIP whose 95% interval over seeds excludes 0 (with only "
               f"{len(sw['seeds'])} seeds these intervals are wide and rough): " +
               "; ".join(f"{m} at N={n}: {k} {d:+.3f} ± {h:.3f}" for m, n, k, d, h in clear) + ".")
    body = (f"`psdclip sweep {args.recipe}`: {recipe.get('description', '').strip()}\n\n"
            f"Source: {yaml.safe_dump(recipe['synthetic'], default_flow_style=True).strip()}; subsets "
            f"{', '.join(sw['subsets'])}; seeds {sw['seeds']}; compute rule {per_run}; evaluated on the held-out "
            f"scenes. Methods: {settings}.\n\nMean ± 95% CI over seeds, and the power-law fits:\n\n"
            f"{open(os.path.join(args.out, 'results.md')).read().strip()}\n\n"
            f"Each method minus CLIP, paired by seed (mean ± 95% CI over seeds, Student t):\n\n" + "\n".join(lines) +
            f"\n\n**{verdict}**\n\nPlots: {args.out}/scaling_*.png.\n")
    record(f"sweep-{recipe['name']}", f"CLIP vs PSD settings: `{recipe['name']}` sweep", body)

if __name__ == "__main__":
    main()
