#!/usr/bin/env bash
# Eviction on a GPU machine without network, in one call: install this checkout, run the CUDA
# eviction tests, the eviction benchmark, the CUDA backend's own tests (regression), and one
# small eviction test under compute-sanitizer memcheck. Logs and JSON go to $OUT (or
# build/gpu_eviction/). Stages have their own time limits so one slow stage can't eat the rest.
#
#   CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90a" scripts/gpu_eviction_check.sh
#   GPU_CHECK_SKIP_INSTALL=1 GPU_EVICT_STAGES="tests bench" scripts/gpu_eviction_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${OUT:-build/gpu_eviction}"
mkdir -p "$OUTDIR"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
STAGES="${GPU_EVICT_STAGES:-tests bench cuda memcheck}"
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "${GPU_CHECK_SKIP_INSTALL:-0}" != "1" ]; then
  start=$(date +%s)
  $PY -m pip install --no-build-isolation --no-deps -v . > "$OUTDIR/install.log" 2>&1 || { tail -40 "$OUTDIR/install.log"; exit 1; }
  echo "installed in $(( $(date +%s) - start )) s"
fi
for stage in $STAGES; do
  echo "== $stage =="
  case $stage in
    tests) timeout 300 $PY -m pytest tests/test_cuda_eviction.py -q -p no:cacheprovider -x > "$OUTDIR/test_cuda_eviction.log" 2>&1
           rc=$?; tail -25 "$OUTDIR/test_cuda_eviction.log" ;;
    bench) CHUNKVALE_BENCH_EVICT_JSON="$OUTDIR/gpu_eviction.json" timeout 300 $PY -m pytest bench/test_bench_gpu_eviction.py \
             -q -s -p no:cacheprovider > "$OUTDIR/bench_eviction.log" 2>&1
           rc=$?; grep -E "^(B=|fixed)|passed|failed|Error" "$OUTDIR/bench_eviction.log" | tail -20 ;;
    cuda)  timeout 300 $PY -m pytest tests/test_cuda.py -q -p no:cacheprovider > "$OUTDIR/test_cuda.log" 2>&1
           rc=$?; tail -3 "$OUTDIR/test_cuda.log" ;;
    memcheck) timeout 240 compute-sanitizer --tool memcheck --error-exitcode 3 $PY -m pytest -q -x -p no:cacheprovider \
             tests/test_cuda_eviction.py -k "host_tier_is_bit_identical and h4 and float16 or digests_summarise and h4 and float16" \
             > "$OUTDIR/memcheck.log" 2>&1
           rc=$?; tail -4 "$OUTDIR/memcheck.log" ;;
    *) echo "unknown stage $stage"; rc=2 ;;
  esac
  [ $rc -eq 0 ] || { echo "stage $stage: exit $rc"; status=1; }
done
exit $status
