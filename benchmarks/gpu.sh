#!/usr/bin/env bash
# The GPU check (issue 32), one command on a fresh device machine with nothing but the copied tree:
#
#     bash benchmarks/gpu.sh          # here, first: bash benchmarks/gpu_wheels.sh (fills .whl/, which travels)
#
# It installs .whl/ into /tmp/site (the device reaches no registry) when psdclip is not importable, then runs
# benchmarks/gpu_check.py: steps (a)-(f), ~9 minutes on one H200, everything it measures written into $OUT
# (gpu.log, summary.json, samples.csv, BENCHMARKS.md with the new sections). Device call, from this machine:
#     run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=600)
# `python benchmarks/gpu_check.py --rehearse` runs the same steps on a CPU at toy sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
: "${OUT:=bench-out/gpu}"
export OUT
mkdir -p "$OUT"
if ! "$PY" -c "import psdclip.workflows.cli, open_clip_train" 2>/dev/null; then
    [ -d .whl ] || { echo "gpu.sh: psdclip is not installed and there is no .whl/ (run benchmarks/gpu_wheels.sh here and carry .whl)" >&2; exit 2; }
    "$PY" benchmarks/gpu_check.py --check-wheels
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        2>&1 | tail -3
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
    "$PY" -c "import psdclip.workflows.cli, open_clip_train, img2dataset.downloader, dask.distributed, fastapi" \
        || { echo "gpu.sh: the installed wheels do not import (see above)" >&2; exit 2; }
fi
"$PY" -m pip list 2>/dev/null | grep -iE "^(torch|torchvision|open.clip.torch|numpy|pandas|webdataset|faiss) " \
    > "$OUT/versions.txt" || true
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
exec "$PY" benchmarks/gpu_check.py --out "$OUT" "$@"
