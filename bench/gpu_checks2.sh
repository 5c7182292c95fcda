#!/bin/bash
# Second GPU call: the PSM disagreement diagnosis, a clean memcheck, and the kernel timings.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
O=${OUT:-$PWD/gpu_checks_out}
mkdir -p "$O"
step() { local name=$1 limit=$2; shift 2; local t0=$SECONDS
  timeout "$limit" "$@" > "$O/$name.log" 2>&1; local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s"; tail -n "${TAIL:-6}" "$O/$name.log"; }
TAIL=40 step psm_diag 90 python3 bench/psm_gpu_diag.py --out "$O/psm_diag.pt"
TAIL=3 step memcheck 75 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 9 python3 bench/sanitize_kernels.py
TAIL=16 step kernels_bench 200 python3 bench/kernels_bench.py --out "$O/kernels_bench.json" --e2e-images 384
