"""CLIP vs PSD: runs `psdclip sweep RECIPE` (resumable: finished runs are reused, a cut-off run continues from
its checkpoint) and records its report in BENCHMARKS.md: the screening, mean ± 95% intervals over seeds, the
power-law fits with their R², and every method minus CLIP paired by seed with the smallest detectable difference.

    python benchmarks/sweep.py [--recipe scaling-cpu] [--out sweeps/scaling-cpu]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _record import record  # noqa: E402

from psdclip.workflows.recipe import load_recipe  # noqa: E402


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
            f"{open(os.path.join(out, 'results.md')).read().strip()}\n\nPlots: "
            + ", ".join(f"`{os.path.join(out, p)}`" for p in plots) + ".\n")
    record(f"sweep-{recipe['name']}", f"CLIP vs PSD: `{recipe['name']}` sweep", body)


if __name__ == "__main__":
    main()
