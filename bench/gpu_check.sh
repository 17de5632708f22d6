#!/usr/bin/env bash
# The one prepared call for a lent GPU machine: the GPU test subset, the benchmark, and the
# static model checked on first contact (every layer timed beside its prediction, ncu counters
# for the main kernels where ncu can read them). Everything it writes goes to $OUT (the device
# tool fetches that folder back), else bench/results. Each part is time-boxed, so a hang in
# one still returns the others' output; the defaults add up to about 9.5 minutes, under the
# device tool's 10 minutes a command: tests 120 s, dispatch plan 45 s, benchmark 90 s,
# emit 110 s, layer timing 120 s, ncu 60 s (each *_TIMEOUT variable overrides its part).
#   bash bench/gpu_check.sh            # full
#   QUICK=1 bash bench/gpu_check.sh    # --quick benchmark
#   SKIP_TESTS=1 SKIP_BENCH=1 bash bench/gpu_check.sh   # only the static-model check
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
MODEL_ARGS=(--model "${MODEL:-edsr_baseline}" --scale "${SCALE:-2}" --lr-size "${LR_SIZE:-540x960}" --dtype bfloat16)
EMIT="$OUT/emit_${MODEL:-edsr_baseline}_x${SCALE:-2}"
part() { echo; echo "== $1 ($(date +%T))"; }

python -m pip install -e . --no-deps -q 2>&1 | tail -1
part "machine"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv; python - <<'PY'
import torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = "none"
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", tv)
PY
command -v ncu >/dev/null && ncu --version | tail -1
} > "$OUT/gpu_info.txt" 2>&1
cat "$OUT/gpu_info.txt"

if [ -z "${SKIP_TESTS:-}" ]; then
  part "GPU tests"
  timeout "${TEST_TIMEOUT:-120}" python -m pytest -q -x --durations=10 \
      tests/test_kernels.py tests/test_fused_ops.py tests/test_fused_models.py tests/test_cuda_graphs.py \
      tests/test_fused_training.py tests/test_backward.py tests/robustness/test_op_inputs.py 2>&1 \
      | tee "$OUT/gpu_tests.txt" | tail -30
fi

# The measured dispatch on first contact: which implementation each layer of EDSR-baseline
# x2 at 540x960 (bf16) gets, with the CUDA-event timings that chose it (issue 14).
part "measured dispatch: model.plan"
timeout "${PLAN_TIMEOUT:-45}" python bench/plan_check.py --out "$OUT/plan.json" 2>&1 | tee "$OUT/plan.txt" | tail -45

if [ -z "${SKIP_BENCH:-}" ]; then
  part "benchmark"
  bench_args=(--out "$OUT" --min-time 0.5)
  [ -n "${QUICK:-}" ] && bench_args+=(--quick)
  timeout "${BENCH_TIMEOUT:-90}" python bench/run.py "${bench_args[@]}" 2>&1 | tee "$OUT/bench_log.txt" | tail -60
fi

# The static model on first contact: emit the model's kernels here (the same manifest a CPU
# machine would write), predict, then run the model and time every launch beside its
# prediction (inference at batch 1 and the LR size, and one training step), and measure the
# ceilings the model assumes (matmul, DRAM copy, an L2-resident copy).
part "static model: emit the kernels"
timeout "${EMIT_TIMEOUT:-110}" python bench/compile_check.py "${MODEL_ARGS[@]}" --emit "$EMIT" --jobs 12 \
    > "$OUT/compile_check.txt" 2>&1 || echo "compile_check exited $? (see compile_check.txt)"
tail -1 "$OUT/compile_check.txt"
part "static model: predict, time each layer beside it"
timeout "${LAYER_TIMEOUT:-120}" python bench/static_model.py "$EMIT" --measure --reps 10 \
    --json "$OUT/static_model.json" --out "$OUT/static_model.txt" 2>&1 | tail -60

# Hardware counters for the main kernels of one inference forward, where ncu can read them
# (Firecracker machines: yes; gVisor: no). --clock-control none leaves the clocks as found;
# --profile-from-start off with the model's cudaProfilerStart: the autotuning warm-up is skipped.
if command -v ncu >/dev/null && [ -f "$EMIT/manifest.json" ]; then
  part "ncu counters"
  metrics=gpu__time_duration.sum,lts__t_bytes.sum.per_second,lts__throughput.avg.pct_of_peak_sustained_elapsed,\
l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,\
smsp__issue_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active,\
dram__bytes.sum.per_second,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active
  timeout "${NCU_TIMEOUT:-60}" ncu --clock-control none --profile-from-start off --target-processes all \
      -k 'regex:resblock|conv2d_nhwc|dgrad|wgrad' --launch-count "${NCU_LAUNCHES:-12}" \
      --metrics "$metrics" --csv --log-file "$OUT/ncu_counters.csv" \
      python bench/static_model.py "$EMIT" --measure --reps 1 --phase inference > "$OUT/ncu_run.txt" 2>&1
  echo "ncu exit $? ($(wc -l < "$OUT/ncu_counters.csv" 2>/dev/null || echo 0) lines in ncu_counters.csv)"
  tail -5 "$OUT/ncu_run.txt"
fi
# The cubins are large and were made here only to be read: keep the manifest and reports.
rm -rf "$EMIT/cubins"
part "done"
