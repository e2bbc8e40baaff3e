#!/usr/bin/env bash
# Everything GPU-side in one go (GPU tests, then the headline benchmark per backend), each
# step's output in $LOG_DIR (default ./gpu-logs). Usage: bash benchmarks/gpu_suite.sh [backend...]
set -u
LOG_DIR=${LOG_DIR:-gpu-logs}
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOG_DIR/gpu.txt"
timeout 240 python3 -m pytest -q -x tests/test_gpu.py 2>&1 | tail -25 | tee "$LOG_DIR/gpu_tests.txt"
for backend in "${@:-flash}"; do
  timeout 300 python3 benchmarks/throughput.py --backend "$backend" 2>&1 | tail -5 | tee "$LOG_DIR/throughput_$backend.txt"
done
