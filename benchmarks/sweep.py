"""CLIP vs PSD: runs `psdclip sweep RECIPE` (resumable: finished runs are reused, a cut-off run continues from
its checkpoint) and records its report in BENCHMARKS.md: the screening, mean ± 95% intervals over seeds, the
power-law fits with their R², and every method minus CLIP paired by seed with the smallest detectable difference.

    python benchmarks/sweep.py [--recipe scaling-cpu] [--out sweeps/scaling-cpu]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _record import record  # noqa: E402

from psdclip.workflows.recipe import load_recipe  # noqa: E402


def training_hours(run: str) -> float:
    """A run's training time from its metrics.jsonl: each logged window's samples over its samples/s."""
    with open(os.path.join(run, "config.yaml")) as f:
        batch = yaml.safe_load(f)["batch_size"]
    seconds, prev = 0.0, 0
    with open(os.path.join(run, "metrics.jsonl")) as f:
        for row in map(json.loads, filter(str.strip, f)):
            if row.get("samples_per_s"):
                seconds += (row["step"] - prev) * batch / row["samples_per_s"]
                prev = row["step"]
    return seconds / 3600


def summary(out: str, primary: str, baseline: str = "clip") -> str:
    """What the study's acceptance reads off its runs: their number and training time, the baseline at the largest N
    of each noise level (primary metric, text->image R@1 against chance), and each method's mean difference from the
    baseline at the largest N over the noise levels (the rule that picks the defaults)."""
    import pandas as pd

    runs = sorted(glob.glob(os.path.join(out, "**", "runs", "*", "metrics.jsonl"), recursive=True))
    hours = sum(training_hours(os.path.dirname(r)) for r in runs)
    df = pd.read_csv(os.path.join(out, "results.csv"))
    df["noise"] = df["noise"].fillna("")
    lines = [f"Runs: {len(runs)}, {hours:.1f} hours of training in all (each run's logged windows: samples over "
             f"samples/s)."]
    diffs: dict[str, list[float]] = {}
    for noise, level in df.groupby("noise", sort=False):
        top = level[level["N"] == level["N"].max()]
        base = top[top["method"] == baseline].set_index("seed")
        t2i, gallery = base["retrieval.t2i_R@1"].mean(), base["retrieval.gallery"].mean()
        lines.append(f"{noise or 'all'}, N={int(top['N'].iloc[0])}: {baseline} {primary} {base[primary].mean():.3f}, "
                     f"text->image R@1 {t2i:.3f} ({t2i * gallery:.0f}x the chance of 1/{gallery:.0f}).")
        for method, rows in top[top["method"] != baseline].groupby("method"):
            d = rows.set_index("seed")[primary] - base[primary]
            diffs.setdefault(method, []).append(float(d.dropna().mean()))
    lines.append(f"Mean {primary} minus {baseline} at the largest N over the noise levels: " + ", ".join(
        f"{m} {sum(v) / len(v):+.3f}" for m, v in sorted(diffs.items(), key=lambda kv: -sum(kv[1]) / len(kv[1]))) + ".")
    return "\n\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipe", default="scaling-cpu")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    recipe = load_recipe(args.recipe)
    out = args.out or recipe.get("out") or os.path.join("sweeps", recipe["name"])
    exe = os.path.join(os.path.dirname(sys.executable), "psdclip")
    subprocess.run([exe, "sweep", args.recipe, "--out", out], check=True)
    sw = recipe["sweep"]
    settings = "; ".join(f"**{k}**: " + ", ".join(f"{a}={b}" for a, b in (v or {}).items())
                         for k, v in {**sw["methods"], **(sw.get("screen") or {}).get("methods", {})}.items())
    plots = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    body = (f"`psdclip sweep {args.recipe}`: {recipe.get('description', '').strip()}\n\n"
            f"Source: {yaml.safe_dump(recipe['synthetic'], default_flow_style=True).strip()}; noise levels: "
            f"{yaml.safe_dump(sw.get('noise') or {}, default_flow_style=True).strip()}; subsets "
            f"{', '.join(map(str, sw['subsets']))}; seeds {sw.get('seeds')} (largest: {sw.get('seeds_largest')}); "
            f"compute {sw['compute']}; primary metric {sw.get('primary')}. Methods: {settings}.\n\n"
            f"{open(os.path.join(out, 'results.md')).read().strip()}\n\n"
            f"{summary(out, sw.get('primary') or sw['metrics'][0])}\n\nPlots: "
            + ", ".join(f"`{os.path.join(out, p)}`" for p in plots) + ".\n")
    record(f"sweep-{recipe['name']}", f"CLIP vs PSD: `{recipe['name']}` sweep", body)


if __name__ == "__main__":
    main()
