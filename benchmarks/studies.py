"""Report the CLIP vs PSD studies and write README's table of each from its report, so that what README shows is
what the runs in studies/ give: for each recipe, `psdclip sweep RECIPE --report` (results.md, results.csv, plots
and summary.md from the finished runs; nothing is trained), then summary.md into README between

    <!-- study-output RECIPE: written by benchmarks/studies.py --> ... <!-- /study-output RECIPE -->

    python benchmarks/studies.py [RECIPE ...]      # default: psd-v2-emoji psd-v2-synthetic

A study still running is reported as it stands (its summary lists the seeds each difference has).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _record import ROOT, readme_block  # noqa: E402

STUDIES = ["psd-v2-emoji", "psd-v2-synthetic"]


def markers(recipe: str) -> tuple[str, str]:
    return (f"<!-- study-output {recipe}: written by benchmarks/studies.py -->", f"<!-- /study-output {recipe} -->")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="*", default=STUDIES)
    args = ap.parse_args()
    exe = os.path.join(os.path.dirname(sys.executable), "psdclip")
    for recipe in args.recipes:
        out = subprocess.run([exe, "sweep", recipe, "--report"], cwd=ROOT, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"psdclip sweep {recipe} --report failed: {(out.stderr or out.stdout).strip()[-500:]}")
        study = os.path.join(ROOT, _out(recipe))
        with open(os.path.join(study, "summary.md"), encoding="utf-8") as f:
            summary = f.read().strip()
        start, end = markers(recipe)
        rel = os.path.relpath(study, ROOT)
        readme_block(start, end, "\n".join([start, f"From `{rel}/summary.md`, written by `psdclip sweep {recipe} "
                                            f"--report` (the whole report: `{rel}/results.md`):", "", summary, end]))
        print(f"README.md: {recipe}'s block rewritten from {rel}/summary.md")


def _out(recipe: str) -> str:
    """The recipe's out folder (as `psdclip sweep --check` resolves the recipe)."""
    from psdclip.workflows.recipe import load_recipe

    return load_recipe(recipe).get("out") or os.path.join("sweeps", recipe)


if __name__ == "__main__":
    main()
