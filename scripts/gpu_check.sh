#!/usr/bin/env bash
# The one-call GPU check, for a session that is lent a CUDA machine (the device tool's `run`).
#
#   here, first:  bash scripts/gpu_check.sh --prepare
#                 (downloads the pure-Python wheels the GPU image lacks into .gpu_wheels/, ignored by git)
#   on the GPU:   run(command="bash scripts/gpu_check.sh", carry=[".gpu_wheels"], timeout_s=580)
#
# About 8 minutes, each step under its own timeout so a hang still leaves the other outputs:
#   env.txt      nvidia-smi, torch / triton versions
#   tests.txt    the Triton kernels compiled for the GPU (no interpreter) and the kernel path of
#                the training autograd against the torch path (tests/core/test_kernels.py,
#                tests/core/test_triton_path.py); the CUDA cases of the core (tests/core/test_functional.py)
#   bench.txt    python -m bench linear llama memory --quick at BRIEF §6 shapes (bf16): single
#                Linear d=1024/4096 × 1k/8k tokens, the 2-layer Llama-7B-shaped step at r=8 with
#                every variant (lohakit_triton included), peak CUDA memory per variant in a
#                fresh process
#   RESULTS_GPU.md / .json   the tables; copy them to bench/ and record the date in bench/RESULTS.md
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prepare" ]; then
    PY="${PY:-python3}"
    [ -x .venv/bin/python ] && PY=.venv/bin/python
    exec "$PY" -m pip download -q --no-deps -d .gpu_wheels "lycoris-lora==4.1.3" "toml>=0.10"
fi
OUT="${OUT:-/tmp/lohakit_gpu}"
mkdir -p "$OUT"
PY="${PY:-python3}"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
unset TRITON_INTERPRET LOHAKIT_TRITON
if compgen -G ".gpu_wheels/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-deps --no-index .gpu_wheels/*.whl > "$OUT/pip.txt" 2>&1
fi
{
    nvidia-smi
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
} > "$OUT/env.txt" 2>&1

timeout 140 "$PY" -m pytest -q -p no:cacheprovider tests/core/test_kernels.py tests/core/test_triton_path.py \
    tests/core/test_functional.py > "$OUT/tests.txt" 2>&1
echo "tests exit status: $?" >> "$OUT/tests.txt"

timeout 380 "$PY" -m bench linear llama memory --quick --out "$OUT/RESULTS_GPU.md" \
    --note "scripts/gpu_check.sh on a lent GPU machine" > "$OUT/bench.txt" 2>&1
echo "bench exit status: $?" >> "$OUT/bench.txt"
tail -n 5 "$OUT/tests.txt" "$OUT/bench.txt"
