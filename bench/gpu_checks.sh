#!/bin/bash
# Every GPU check of ../shared/GPU.md in one call on a CUDA machine (run from the repository root):
#   bash bench/gpu_checks.sh            (outputs under $OUT, or ./gpu_checks_out)
# 1. pytest -m gpu  2. compute-sanitizer memcheck + racecheck over both kernels
# 3. kernels and torch CUDA path vs references (bench/kernels_bench.py)  4. whole scan GPU vs CPU.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
O=${OUT:-$PWD/gpu_checks_out}
mkdir -p "$O"
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
  python3 -c "import torch,torchvision,sys;print(sys.version.split()[0],torch.__version__,torchvision.__version__,'cuda',torch.version.cuda)"
  python3 -m pip list 2>/dev/null | grep -iE "^(cuda|nvidia-cuda-nvrtc|onnxruntime|timm|safetensors|pillow|numpy) "
  nproc; } > "$O/env.txt" 2>&1
cat "$O/env.txt"
step() { local name=$1 limit=$2; shift 2; local t0=$SECONDS
  timeout "$limit" "$@" > "$O/$name.log" 2>&1; local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s"; tail -n "${TAIL:-6}" "$O/$name.log"; }
step pytest_gpu 150 python3 -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml="$O/junit_gpu.xml" tests
TAIL=3 step memcheck 75 compute-sanitizer --tool memcheck --error-exitcode 9 python3 bench/sanitize_kernels.py
TAIL=3 step racecheck 75 compute-sanitizer --tool racecheck --error-exitcode 9 python3 bench/sanitize_kernels.py
cat "$O/racecheck.log" >> "$O/memcheck.log"; rm "$O/racecheck.log"
TAIL=16 step kernels_bench 150 python3 bench/kernels_bench.py --out "$O/kernels_bench.json" --e2e-images 384
TAIL=6 step scan_gpu 120 python3 bench/gpu_scan_check.py --images 256 --json "$O/scan_gpu.json"
