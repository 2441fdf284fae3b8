"""Write a benchmark's figures into BENCHMARKS.md, between markers of its own, with the command."""
from __future__ import annotations

import datetime
import os
import platform
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the environment the command was started with (Dask's LocalCluster sets OMP_NUM_THREADS=1 in this process's
# environment for its workers, which would otherwise be reported as part of the command)
_STARTED_WITH = {k: os.environ[k] for k in ("OMP_NUM_THREADS",) if k in os.environ}


def machine() -> str:
    text = f"{os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}"
    torch = sys.modules.get("torch")  # a GPU is named where the benchmark used torch and one is there
    if torch is not None and torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()} (torch {torch.__version__})"
    return text


def record(name: str, title: str, body: str) -> None:
    # PSDCLIP_BENCHMARKS: another file to record into (benchmarks/gpu_check.py writes into $OUT's copy)
    path = os.environ.get("PSDCLIP_BENCHMARKS") or os.path.join(ROOT, "BENCHMARKS.md")
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else \
        "# Benchmarks\n\nEvery figure here is written by a script in `benchmarks/`, with the command that ran it.\n"
    env = "".join(f"{k}={v} " for k, v in _STARTED_WITH.items())  # it changes figures
    cmd = env + "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    body = body.replace(ROOT.rstrip(os.sep) + os.sep, "")  # paths relative to the repo: a reader has no /work/...
    section = (f"<!-- {name}:start -->\n## {title}\n\nCommand: `{cmd}`  \n"
               f"Run: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {machine()}\n\n"
               f"{body.strip()}\n<!-- {name}:end -->")
    pattern = re.compile(rf"<!-- {name}:start -->.*?<!-- {name}:end -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"recorded in {path}")


def readme_block(start: str, end: str, block: str) -> None:
    """Replace README.md's text from the marker line START to END (both kept) with BLOCK (markers included)."""
    path = os.path.join(ROOT, "README.md")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if start not in text or end not in text:
        raise SystemExit(f"{path}: no {start} ... {end} block to write")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + block + tail)
