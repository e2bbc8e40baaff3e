#!/usr/bin/env bash
# Everything GPU-side in one go, each step's output in $LOG_DIR (default ./gpu-logs):
#   tests      the GPU test files, whole (CPU-side cases included; two-GPU cases need two GPUs)
#   kernels    benchmarks/attn_kernel.py with a bf16 and an fp8 pool (256 x 850 keys; 128 ragged)
#   headline   benchmarks/throughput.py: default, --kv-cache-dtype fp8, --batch-invariant
# With two or more GPUs the tests run on GPU 1 while the benchmarks run on GPU 0 (the two-GPU
# tests then run last, alone); with one, everything runs in turn. Summary lines at the end.
# Usage: bash benchmarks/gpu_suite.sh [backend]   (default triton)
set -u
LOG_DIR=${LOG_DIR:-gpu-logs}
BACKEND=${1:-triton}
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOG_DIR/gpu.txt"
GPUS=$(nvidia-smi --list-gpus | wc -l)
TESTS="tests/test_gpu.py tests/test_triton_attn.py tests/test_batch_invariant.py"

benchmarks() {
  for dtype in auto fp8; do
    timeout 120 python3 benchmarks/attn_kernel.py --kv-cache-dtype "$dtype" > "$LOG_DIR/attn_$dtype.txt" 2>&1
    timeout 120 python3 benchmarks/attn_kernel.py --kv-cache-dtype "$dtype" --ragged --num-seqs 128 \
      > "$LOG_DIR/attn_${dtype}_ragged128.txt" 2>&1
  done
  for mode in default fp8 invariant; do
    case $mode in
      default) extra=() ;;
      fp8) extra=(--kv-cache-dtype fp8) ;;
      invariant) extra=(--batch-invariant) ;;
    esac
    timeout 300 python3 benchmarks/throughput.py --backend "$BACKEND" ${extra[@]+"${extra[@]}"} \
      > "$LOG_DIR/throughput_$mode.txt" 2>&1
  done
}

tests() {
  timeout -s INT 900 python3 -m pytest -q -rs --durations=10 $TESTS "$@" > "$LOG_DIR/tests.txt" 2>&1
}

if [ "$GPUS" -ge 2 ]; then
  (export CUDA_VISIBLE_DEVICES=0; benchmarks) &
  (export CUDA_VISIBLE_DEVICES=1; tests -k "not two_ranks and not tp2") &
  wait
  timeout -s INT 600 python3 -m pytest -q -rs $TESTS -k "two_ranks or tp2" > "$LOG_DIR/tests_2gpu.txt" 2>&1
else
  benchmarks
  tests
fi
grep -h summary "$LOG_DIR"/attn_*.txt
grep -h '^{' "$LOG_DIR"/throughput_*.txt
tail -n 1 "$LOG_DIR"/tests*.txt
