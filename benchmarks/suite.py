"""The test suite's wall time (issue 31.7: `make test` under 10 minutes on these two cores, the fresh venv
excluded), with its 25 slowest tests, recorded in BENCHMARKS.md. Runs the README's test command in this venv.

    python benchmarks/suite.py [--note "what else was running"]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _record import record  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOAL_S = 600


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--note", default="Nothing else was running.", help="what else ran on the machine meanwhile")
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=25"]
    t = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t
    out = r.stdout + r.stderr
    summary = [line for line in out.splitlines() if re.search(r"\d+ passed", line)][-1:]
    slow = out.split("slowest 25 durations", 1)[-1].split("short test summary", 1)[0]
    rows = [line.strip() for line in slow.splitlines() if re.match(r"\s*\d+\.\d+s (call|setup|teardown)", line)]
    skipped = [line.strip() for line in out.splitlines() if line.startswith("SKIPPED")]
    if r.returncode != 0:
        print(out[-5000:])
        raise SystemExit(f"the suite failed (exit {r.returncode}); nothing recorded")
    body = (f"`{' '.join(['python'] + cmd[1:])}` (the README's `make test` command, in an installed venv), "
            f"{args.note}\n\n**suite wall time = {wall:.0f} s** (goal < {GOAL_S} s): {summary[0] if summary else ''}\n\n"
            + ("Skipped: " + "; ".join(s[len('SKIPPED '):] for s in skipped) + "\n\n" if skipped else "")
            + "The 25 slowest:\n\n```text\n" + "\n".join(rows) + "\n```\n")
    record("suite", "Tests: the suite's wall time", body)
    print(f"suite: {wall:.0f} s; {summary[0] if summary else ''}")


if __name__ == "__main__":
    main()
