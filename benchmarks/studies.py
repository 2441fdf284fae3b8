"""Report the CLIP vs PSD studies and write README's table of each from its report, so that what README shows is
what the runs in studies/ give: for each recipe, `psdclip sweep RECIPE --report` (results.md, results.csv, plots
and summary.md from the finished runs; nothing is trained), then summary.md into README between

    <!-- study-output RECIPE: written by benchmarks/studies.py --> ... <!-- /study-output RECIPE -->

    python benchmarks/studies.py [RECIPE ...]      # default: psd-v2-emoji psd-v2-synthetic

It also records in BENCHMARKS.md the training time of each study's runs (read from their metrics logs). A study
still running is reported as it stands (its summary lists the seeds each difference has).

With both psd-v2 studies (the default), it also writes the block `psd-default`: issue 26 step 6's rule, as the
psd-v2-synthetic recipe declares it, applied to their results: the PSD reading with the best mean rank of its
difference from CLIP on each study's primary metric at its largest N, ties to the emoji study (real images); a gain
only if its interval clears zero in one study and its mean is not below CLIP's in the other.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _record import ROOT, readme_block, record  # noqa: E402

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
        source = f"From `{rel}/summary.md`, written by `psdclip sweep {recipe} --report` (the whole report: " \
            f"`{rel}/results.md`):"
        readme_block(start, end, "\n".join([start, source, "", summary, end]))
        print(f"README.md: {recipe}'s block rewritten from {rel}/summary.md")
    timed = dict.fromkeys(args.recipes + (["psd-v2-regime"] if args.recipes == STUDIES else []))
    record("psd-v2-studies", "CLIP vs PSD: the psd-v2 studies' training time", "\n".join(
        [BESIDE, "", "| study | runs | training hours | median minutes a run | median samples/s |",
         "|---|---|---|---|---|"] + [time_row(r) for r in timed]))
    if all(r in args.recipes for r in STUDIES):
        start, end = markers("psd-default")
        readme_block(start, end, "\n".join([start, default_rule(STUDIES), end]))
        print("README.md: psd-default's block rewritten")


BESIDE = ("How they ran: each study's runs in one or two `psdclip sweep RECIPE [--methods ...]` processes side by "
          "side on the 2 cores (the recipes pin `--threads 1 --workers 1` for every run), over several sessions; at "
          "times a test file or a report ran beside them, never a timing benchmark. Training time per run is read "
          "from its metrics log (the time between consecutive log lines, gaps over 10 minutes, i.e. a resume, "
          "left out); evaluation is not included.")


def time_row(recipe: str) -> str:
    """One study's runs: count, summed training hours, median minutes and samples/s, from runs/*/metrics.jsonl."""
    import glob
    import json

    import numpy as np

    minutes, speeds = [], []
    for path in glob.glob(os.path.join(ROOT, _out(recipe), "**", "runs", "*", "metrics.jsonl"), recursive=True):
        rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
        rows = [r for r in rows if "time" in r and "step" in r]
        if len(rows) < 2:
            continue
        t = np.diff([r["time"] for r in rows])
        steps = np.diff([r["step"] for r in rows])
        keep = (t > 0) & (t < 600) & (steps > 0)
        per_step = t[keep].sum() / max(steps[keep].sum(), 1)
        minutes.append(per_step * rows[-1]["step"] / 60)  # the whole run at its logged pace
        speeds.append(float(np.median([r["samples_per_s"] for r in rows if "samples_per_s" in r])))
    if not minutes:
        return f"| {recipe} | 0 | | | |"
    return (f"| {recipe} | {len(minutes)} | {sum(minutes) / 60:.1f} | {np.median(minutes):.1f} | "
            f"{np.median(speeds):.0f} |")


def default_rule(recipes: list[str]) -> str:
    """Step 6's rule over the studies (the first is the tie-breaker) as one paragraph and a table of ranks."""
    import pandas as pd

    from psdclip.workflows.recipe import load_recipe
    from psdclip.workflows.report import rank_readings

    studies = []
    for recipe in recipes:
        spec = load_recipe(recipe)
        sweep = spec["sweep"]
        psd = [m for m, o in sweep["methods"].items()
               if (o or {}).get("loss") == "psd" and not o.get("oracle_targets")]
        table = pd.read_csv(os.path.join(ROOT, spec["out"], "results.csv"))
        studies.append((recipe, table, sweep.get("primary") or sweep["metrics"][0], psd))
    r = rank_readings(studies)
    best = r["best"]
    lines = [f"The rule declared in `psd-v2-synthetic`'s recipe over {' and '.join(recipes)}: "
             f"**{best}** has the best mean rank (ties to {recipes[0]}), and is "
             + ("a measured gain over CLIP." if r["gain"] else "not a measured gain over CLIP (its interval clears "
                "zero in neither study, or its mean is below CLIP's in one): the best non-degenerate reading."), "",
             "| PSD reading | " + " | ".join(f"rank in {n} (Δ vs CLIP, seeds)" for n in recipes) + " | mean rank |",
             "|---|" + "---|" * (len(recipes) + 1)]
    for m in r["order"]:
        cells = [f"{r['ranks'][n][m]} ({r['deltas'][n][m]['diff']:+.3f}, {r['deltas'][n][m]['seeds']})"
                 .replace("-", "−") for n in recipes]
        lines.append(f"| `{m}` | " + " | ".join(cells) + f" | {r['mean'][m]:.1f} |")
    return "\n".join(lines)


def _out(recipe: str) -> str:
    """The recipe's out folder (as `psdclip sweep` resolves the recipe)."""
    from psdclip.workflows.recipe import load_recipe

    return load_recipe(recipe).get("out") or os.path.join("sweeps", recipe)


if __name__ == "__main__":
    main()
