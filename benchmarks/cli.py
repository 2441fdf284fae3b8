"""CLI start-up: whole `psdclip` processes, as a user types them (median of several runs each).

    python benchmarks/cli.py [--dataset demo-out/dataset] [--run demo-out/runs/psd] [--repeats 5]

Goals (issue 14): `psdclip --help` and every `psdclip <command> --help` <= 0.5 s; `psdclip data stats` on the
demo dataset <= 1 s; the processes of `data serve` and `data build` never import torch. With --run, also a
command that loads the model stack (`psdclip export RUN`) through the console script (which skips Python's
teardown of torch's modules) beside the same main() left to exit as a plain Python program does.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _record import record  # noqa: E402

EXE = os.path.join(os.path.dirname(sys.executable), "psdclip")


PLAIN_EXIT = [sys.executable, "-c", "import sys; from psdclip.workflows.cli import main; sys.exit(main(sys.argv[1:]))"]


def timed(args: list[str], repeats: int, exe: list[str] | None = None) -> tuple[float, float]:
    """(median seconds, max resident MB) of a whole process."""
    times, rss = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = subprocess.run(["/usr/bin/time", "-f", "%M", *(exe or [EXE]), *args], capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise SystemExit(f"psdclip {' '.join(args)} failed: {r.stderr[-500:]}")
        rss.append(int(r.stderr.strip().splitlines()[-1]) / 1024)
    return statistics.median(times), max(rss)


def main():
    from psdclip.workflows.cli import COMMANDS

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", default="demo-out/dataset")
    ap.add_argument("--run", default="demo-out/runs/psd", help="a run for the export case (skipped if missing)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    cases = [["--help"]] + [[*c.path, "--help"] for c in COMMANDS]
    if os.path.isdir(args.dataset):
        cases.append(["data", "stats", args.dataset])
    rows = []
    for case in cases:
        seconds, mb = timed(case, args.repeats)
        goal = 1.0 if case[:2] == ["data", "stats"] else 0.5
        rows.append((" ".join(case), seconds, mb, goal))
        print(f"psdclip {' '.join(case):<40} {seconds:6.3f} s  {mb:6.0f} MB", flush=True)
    probe = ("import sys, psdclip.workflows.cli as c, psdclip.workflows.commands, psdclip.pipeline.serve; "
             "print(sorted(m for m in ('torch', 'faiss', 'open_clip') if m in sys.modules))")
    heavy = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip()
    worst = max(s for c, s, _, g in rows if g == 0.5)
    lines = ["| command | median s | max RSS MB | goal s |", "|---|---|---|---|"]
    lines += [f"| `psdclip {c}` | {s:.3f} | {m:.0f} | {g} |" for c, s, m, g in rows]
    body = (f"Whole processes, median of {args.repeats} runs each (nothing else running).\n\n" + "\n".join(lines) +
            f"\n\n**slowest --help {worst:.3f} s** (goal <= 0.5 s). Heavy modules loaded by the CLI, its command "
            f"functions and the data server: {heavy} (goal: none).")
    if os.path.isdir(args.run):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            case = ["export", args.run, "--out", os.path.join(tmp, "model.pt")]
            quick, _ = timed(case, args.repeats)
            plain, _ = timed(case, args.repeats, PLAIN_EXIT)
        print(f"export: console script {quick:.3f} s, plain exit {plain:.3f} s", flush=True)
        body += (f"\n\nA command that loads torch and open_clip, `psdclip export {args.run} --out TMP`: "
                 f"**{quick:.3f} s** through the console script (exits once main() returns, after atexit "
                 f"handlers and flushes) against {plain:.3f} s for the same main() left to Python's own "
                 f"teardown ({plain - quick:.2f} s saved per command).")
    record("cli-startup", "CLI start-up", body)


if __name__ == "__main__":
    main()
