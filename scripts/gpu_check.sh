#!/usr/bin/env bash
# One command on a GPU machine without network: install chunkvale from this checkout (its
# build dependencies -- scikit-build-core, nanobind -- and torch, numpy, pytest must already
# be installed), run the CUDA tests, run the GPU benchmarks, print a short table last.
#
#   scripts/gpu_check.sh                 # everything
#   GPU_CHECK_SKIP_INSTALL=1 scripts/gpu_check.sh
#   GPU_CHECK_BENCH=0 scripts/gpu_check.sh     # tests only
#   GPU_CHECK_SANITIZER=0 scripts/gpu_check.sh # skip the compute-sanitizer runs
#   CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90a" scripts/gpu_check.sh   # one arch: faster build
#
# FlashInfer is optional: `pip install --no-build-isolation --no-deps flashinfer-python==0.2.14.post1`
# from a local sdist/wheel before running, and the benchmarks time it too.
# Outputs (logs, JSON) go to $OUT if set, else build/gpu_check/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${OUT:-build/gpu_check}"
mkdir -p "$OUTDIR"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
status=0

echo "== device =="
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUTDIR/nvidia-smi.txt"

if [ "${GPU_CHECK_SKIP_INSTALL:-0}" != "1" ]; then
  echo "== install (pip install --no-build-isolation --no-deps .) =="
  start=$(date +%s)
  if ! $PY -m pip install --no-build-isolation --no-deps -v . > "$OUTDIR/install.log" 2>&1; then
    tail -50 "$OUTDIR/install.log"
    echo "install failed"
    exit 1
  fi
  echo "installed in $(( $(date +%s) - start )) s"
fi
$PY - <<'PY'
import chunkvale, torch
print("chunkvale", chunkvale.__version__, "cuda_built", chunkvale.cuda_built(),
      "cuda_available", chunkvale.cuda_available(), "torch", torch.__version__,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
if not chunkvale.cuda_available():
    raise SystemExit("chunkvale reports no usable CUDA GPU: nothing to check")
PY
[ $? -eq 0 ] || exit 1

echo "== CUDA tests =="
# First the quick ones that localise a failure (harness on the CPU, errors, one shape).
$PY -m pytest tests/test_cuda.py -q -x -p no:cacheprovider \
  -k "driver_on_cpu or errors or read_tile or flags" 2>&1 | tail -15
$PY -m pytest tests/test_cuda.py -q -p no:cacheprovider --junitxml="$OUTDIR/test_cuda.xml" \
  > "$OUTDIR/test_cuda.log" 2>&1
rc=$?
tail -25 "$OUTDIR/test_cuda.log"
[ $rc -eq 0 ] || status=1
tests_summary=$(tail -1 "$OUTDIR/test_cuda.log")

if [ "${GPU_CHECK_SANITIZER:-1}" != "0" ] && command -v compute-sanitizer > /dev/null; then
  # One small shape under memcheck (out-of-bounds, misaligned) and racecheck (shared-memory
  # hazards: the kernels' barriers were reasoned about, never observed).
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer --tool $tool (one small test) =="
    timeout 900 compute-sanitizer --tool "$tool" --error-exitcode 3 $PY -m pytest -q -x -p no:cacheprovider \
      "tests/test_cuda.py::test_random_trees[16-8q2kv128d-float16]" \
      > "$OUTDIR/sanitizer_$tool.log" 2>&1
    rc=$?
    tail -5 "$OUTDIR/sanitizer_$tool.log"
    [ $rc -eq 0 ] || { echo "compute-sanitizer $tool: exit $rc"; status=1; }
  done
fi

echo "== core tests on the CPU (same build) =="
$PY -m pytest tests -q -p no:cacheprovider -k "not hf and not engine and not cli and not test_cuda" \
  > "$OUTDIR/test_core.log" 2>&1 || status=1
tail -3 "$OUTDIR/test_core.log"

if [ "${GPU_CHECK_BENCH:-1}" != "0" ]; then
  echo "== GPU benchmarks =="
  CHUNKVALE_BENCH_JSON="$OUTDIR/gpu_decode.json" $PY -m pytest bench/test_bench_gpu.py -q -p no:cacheprovider \
    > "$OUTDIR/bench.log" 2>&1 || status=1
  tail -15 "$OUTDIR/bench.log"
fi

echo "== summary =="
echo "CUDA tests: $tests_summary"
if [ -f "$OUTDIR/gpu_decode.json" ]; then
  $PY - "$OUTDIR/gpu_decode.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
def f(x):
    return f"{x:8.1f}" if isinstance(x, (int, float)) else ("   err  " if x else "    -   ")
cols = ["chunkvale_us", "chunkvale_eager_us", "torch_sdpa_us", "flashinfer_paged_us",
        "flashinfer_paged_tc_us", "flashinfer_cascade_us", "floor_us"]
if rows:
    print(f"GPU: {rows[0]['gpu']}, copy bandwidth {rows[0]['copy_bw_TBps']:.2f} TB/s, chunk {rows[0]['chunk']}; times in us")
print(f"{'table':9} {'B':>4} {'ns':>5} {'nu':>5} | cv(graph) cv(eager)  sdpa     fi_paged fi_tc    fi_casc  floor   | vs best FI")
for r in rows:
    fi = [r.get(c) for c in ("flashinfer_paged_us", "flashinfer_paged_tc_us", "flashinfer_cascade_us")]
    fi = [x for x in fi if isinstance(x, (int, float))]
    cv = r.get("chunkvale_us") or r.get("chunkvale_eager_us")
    ratio = f"{min(fi) / cv:5.2f}x" if fi and cv else "  -"
    print(f"{r['table']:9} {r['B']:4d} {r['ns']:5d} {r['nu']:5d} |" + " ".join(f(r.get(c)) for c in cols) + f" | {ratio}")
PY
fi
exit $status
