"""Time `psdclip demo` (what `make demo` runs) end to end on this machine and record it in BENCHMARKS.md
with the demo's own summary (CLIP vs PSD on the demo data). Goal: at most 10 minutes on 2 cores.

    python benchmarks/demo.py [--out bench-out/demo]
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


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench-out/demo")
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
    record("demo", "Demo: `make demo` end to end", body)


if __name__ == "__main__":
    main()
