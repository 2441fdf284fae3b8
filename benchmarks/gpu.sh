#!/usr/bin/env bash
# The GPU check (issue 13), for one CUDA GPU (sized for an H200: under 8 minutes). Records into BENCHMARKS.md:
#   1. PSD / CLIP step time for every PSD setting, ViT-B-32 bf16, batch 256 (goal <= 1.02)
#   2. ViT-B-32 bf16 samples/s: psdclip's trainer vs open_clip_train on the same shards, model and batch (goal >= 1.0)
#   3. the same trainer with --accum 4 at the same global batch, and peak GPU memory of each
# Needs the project installed (pip install -e '.[gpu,dev]'; make install gives faiss-cpu) plus
# open_clip_torch[training]; the device machine has no internet, so bring wheels (see the device tool's README) when
# they are missing there.
#
#     bash benchmarks/gpu.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
export PYTHONUNBUFFERED=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: this check runs on a GPU'; print(torch.cuda.get_device_name())"
OUT=${BENCH_OUT:-bench-out/gpu}
mkdir -p "$OUT"
# 1. step time (in-memory tensors)
timeout 150 "$PY" benchmarks/train.py --only step --device cuda --step-model ViT-B-32 --batch-size 256 --rounds 4 --out "$OUT"
# 2 + 3. throughput on real shards (12k synthetic images built by the pipeline), with and without --accum 4
timeout 420 "$PY" benchmarks/train.py --only throughput --device cuda --model ViT-B-32 --images 12000 --steps 40 --batch-size 256 \
    --workers 12 --out "$OUT"
timeout 240 "$PY" benchmarks/train.py --only accum --device cuda --model ViT-B-32 --images 12000 --steps 40 \
    --batch-size 256 --workers 12 --out "$OUT"
