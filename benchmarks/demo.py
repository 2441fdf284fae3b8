"""Time `psdclip demo` (what `make demo` runs) end to end on this machine and record it in BENCHMARKS.md
with the demo's own summary (CLIP vs PSD on the demo data). Goal: at most 10 minutes on 2 cores. Then write
README's "Real output" block from the same folder (data stats, a query, an evaluation and the comparison), so
that what README shows is what the command gives from an empty folder.

    python benchmarks/demo.py [--out bench-out/demo] [--no-timing]

--no-timing: README's block only, no timing recorded (while a study shares the cores).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _record import readme_block as write_block, record  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench-out/demo")
    ap.add_argument("--no-timing", action="store_true", help="write README's block only (no BENCHMARKS.md timing)")
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    exe = os.path.join(os.path.dirname(sys.executable), "psdclip")
    t = time.time()
    r = subprocess.run([exe, "demo", "--out", args.out], capture_output=True, text=True)
    seconds = time.time() - t
    if r.returncode:
        print(r.stderr[-3000:])
        raise SystemExit("the demo failed")
    summary = r.stdout[r.stdout.index("=" * 78) + 79:].split("\nexample queries")[0].strip()
    queries = "example queries" + r.stdout.split("\nexample queries", 1)[1].rstrip()
    from psdclip.workflows.demo import DEMO_DIFFICULTY, DemoConfig

    d = DemoConfig()
    body = (f"`psdclip demo` with its defaults ({d.n:,} synthetic pairs with 20% mismatched, 10% shared and 5% "
            f"low-information captions at a declared easier difficulty {DEMO_DIFFICULTY}; {d.heldout} held-out "
            f"scenes x 6 renderings; {d.model}, {d.steps} steps x {d.batch_size} for each of CLIP and PSD), from an "
            f"empty output folder, whole command: **{seconds / 60:.1f} minutes** (goal <= 10).\n\nThe demo's own "
            f"comparison (one seed each, so differences are within noise; the study in README is the real "
            f"comparison):\n\n```\n{summary}\n```\n\nIts example queries, answered by the demo's service:\n\n"
            f"```\n{queries}\n```\n")
    if not args.no_timing:
        record("demo", "Demo: `make demo` end to end", body)
    readme_block(exe, args.out)


START, END = "<!-- demo-output: written by benchmarks/demo.py -->", "<!-- /demo-output -->"


def readme_block(exe: str, out: str) -> None:
    """README's block between START and END: the commands on the demo's folder, their output as it is (paths
    shortened to demo-out), excerpts marked as such."""
    def run(*args):
        r = subprocess.run([exe, *args], capture_output=True, text=True, check=True)
        return r.stdout.replace(os.path.abspath(out), "demo-out").replace(out, "demo-out").rstrip()

    stats = run("data", "stats", f"{out}/dataset")
    query = run("index", "query", f"{out}/index", "--text", "a large blue square", "-k", "5")
    keep = ("zeroshot_shape_base", "zeroshot_shape_sketch", "zeroshot_shape_noise", "linear_probe_shape.accuracy",
            "zeroshot_colour_base", "retrieval.t2i_R@1 ", "retrieval.t2i_R@10", "retrieval.gallery")
    ev = run("eval", f"{out}/runs/psd", "--suite", f"synthetic:{out}/synth").splitlines()
    ev = "\n".join([ev[0], ""] + [ln for ln in ev if ln.startswith(keep)])
    cmp_ = run("compare", f"{out}/runs/clip", f"{out}/runs/psd").splitlines()
    rows = [ln for ln in cmp_ if ln.startswith("| suite") or ln.startswith("|---")][:2] + \
        [ln for ln in cmp_ if ln.startswith("| synthetic |") and any(
            f"| {m} |" in ln for m in ("zeroshot_shape_base.top1", "zeroshot_shape_noise.top1",
                                       "linear_probe_shape.accuracy", "retrieval.t2i_R@1"))]
    block = "\n".join([
        START, "```text", "$ psdclip data stats demo-out/dataset", stats, "",
        '$ psdclip index query demo-out/index --text "a large blue square" -k 5', query, "",
        "$ psdclip eval demo-out/runs/psd --suite synthetic:demo-out/synth      # (excerpt)", ev, "",
        "$ psdclip compare demo-out/runs/clip demo-out/runs/psd                  # (excerpt; also compare.md, "
        "compare.png)", *rows, "```", END])
    write_block(START, END, block)
    print(f"README.md: demo output block rewritten from {out}")


if __name__ == "__main__":
    main()
