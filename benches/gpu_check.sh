#!/usr/bin/env bash
# The GPU checks of a CUDA build in one run: parity (tests/python/test_cuda.py) and generate timed against
# transformers on the same card (benches/compare.py --device cuda), base in bf16 and f32, then large in bf16.
#
#     bash benches/gpu_check.sh CHECKPOINTS_DIR [RESULTS_DIR]
#
# Needs a python3 with torch (CUDA), transformers, pytest, scikit-image and a CUDA build of florence2_rs
# (`maturin build -r --features python,cuda`, or benches/cuda_wheel.sh where the build machine has no CUDA).
# Random checkpoints are built into CHECKPOINTS_DIR when missing.
# Logs and JSON go to RESULTS_DIR (default: the current folder); the tables are printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
ckpt=${1:?usage: gpu_check.sh CHECKPOINTS_DIR [RESULTS_DIR]}
results=${2:-.}
mkdir -p "$results"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -c "import florence2_rs._native as n, torch, transformers as t
print('CUDA build:', n.CUDA_BUILD, '| GPU seen:', n.cuda_available(), '| torch', torch.__version__, '| transformers', t.__version__)
assert n.cuda_available()" || exit 1
python3 -m pytest -q -p no:cacheprovider tests/python/test_cuda.py 2>&1 | tee "$results/pytest.log" | tail -25
status=${PIPESTATUS[0]}
for run in "base bfloat16" "base float32" "large bfloat16"; do
    set -- $run
    python3 benches/compare.py --device cuda --checkpoints "$ckpt" --spec "$1" --dtype "$2" --repeats 3 \
        --json "$results/compare-$1-$2.json" 2>&1 | tee "$results/compare-$1-$2.txt"
done
echo "pytest exit status: $status"
