#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with what benchmarks/gpu.sh installs on the device machine, which reaches no registry:
# the wheels of benchmarks/gpu-requirements.txt for Python 3.12 on x86-64 Linux, and psdclip's own wheel built from
# this checkout, stamped with a hash of the sources it was built from (gpu.sh refuses a stale one). Run it here,
# where the registries are, before every device call that changes code:
#
#     bash benchmarks/gpu_wheels.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
LIMIT_MIB=${GPU_WHEELS_LIMIT_MIB:-58}  # a device call carries 64 MiB in all, the tree (~3.5 MiB) included
mkdir -p .whl
rm -f .whl/psdclip-*.whl .whl/psdclip-tree.sha256
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl -r benchmarks/gpu-requirements.txt 2>&1 \
    | grep -v "^WARNING: Location" || true
# one version of each package: an older download left beside a new one would stop the whole install there
"$PY" - <<'PY'
import os, re
pins = {re.sub(r"[-_.]+", "_", l.split("==")[0]).lower(): l.split("==")[1].strip()
        for l in open("benchmarks/gpu-requirements.txt") if "==" in l and not l.startswith("#")}
for f in sorted(os.listdir(".whl")):
    if not f.endswith(".whl"):
        continue
    name, version = f.split("-")[:2]
    key = re.sub(r"[-_.]+", "_", name).lower()
    if pins.get(key) != version:
        os.remove(os.path.join(".whl", f))
        print(f"removed {f} (not in benchmarks/gpu-requirements.txt)")
missing = set(pins) - {re.sub(r"[-_.]+", "_", f.split("-")[0]).lower() for f in os.listdir(".whl")}
if missing:
    raise SystemExit(f"gpu_wheels: no wheel downloaded for {', '.join(sorted(missing))}")
PY
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl . > .whl/build.log 2>&1 \
    || { cat .whl/build.log; exit 1; }
rm -rf build
"$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); from gpu_check import tree_sha; print(tree_sha())" \
    > .whl/psdclip-tree.sha256
size=$(du -sm .whl | cut -f1)
echo "gpu_wheels: $(ls .whl/*.whl | wc -l) wheels, ${size} MiB in .whl/ (limit ${LIMIT_MIB} MiB)"
if [ "$size" -gt "$LIMIT_MIB" ]; then
    echo "gpu_wheels: .whl/ is over ${LIMIT_MIB} MiB: a device call would refuse the tree" >&2
    exit 1
fi
