#!/usr/bin/env bash
# The one prepared call for a lent GPU machine: the GPU test subset, then the benchmark.
# Everything it writes goes to $OUT (the device tool fetches that folder back), else
# bench/results. Budget: ~4 min of tests + ~5 min of benchmark; each part is time-boxed so
# a hang in one still returns the other's output.
#   bash bench/gpu_check.sh            # full
#   QUICK=1 bash bench/gpu_check.sh    # --quick benchmark only
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
python -m pip install -e . --no-deps -q 2>&1 | tail -1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python - <<'PY'
import torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = "none"
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", tv)
PY
} > "$OUT/gpu_info.txt" 2>&1
cat "$OUT/gpu_info.txt"
timeout "${TEST_TIMEOUT:-300}" python -m pytest -q -x --durations=10 \
    tests/test_kernels.py tests/test_fused_ops.py tests/test_fused_models.py tests/test_cuda_graphs.py \
    tests/test_fused_training.py tests/test_backward.py tests/robustness/test_op_inputs.py 2>&1 | tee "$OUT/gpu_tests.txt" | tail -30
bench_args=(--out "$OUT" --min-time 0.5)
[ -n "${QUICK:-}" ] && bench_args+=(--quick)
timeout "${BENCH_TIMEOUT:-300}" python bench/run.py "${bench_args[@]}" 2>&1 | tee "$OUT/bench_log.txt" | tail -60
