#!/usr/bin/env bash
# The C++ core under sanitizers (CPU only, no Python):
#   1. ASan + UBSan: every ctest test and the C++ example (examples/cpp, built against the
#      installed package with the same flags);
#   2. TSan: the host-tier and thread tests (the backup worker, the attention thread pool,
#      concurrent readers).
# Any report fails the run. Build trees: build/asan, build/tsan (kept for quick reruns).
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${JOBS:-$(nproc 2>/dev/null || echo 2)}
t0=$(date +%s)
mkdir -p build  # the logs below sit beside the build trees (a fresh clone has no build/)

configure() {  # build dir, sanitizer list
  cmake -S . -B "$1" -DCHUNKVALE_CUDA=OFF -DCHUNKVALE_TESTS=ON -DCHUNKVALE_SANITIZE="$2" \
    -DCMAKE_BUILD_TYPE=Debug > "$1.configure.log" 2>&1 || { cat "$1.configure.log"; exit 1; }
}

echo "== ASan + UBSan: build =="
configure build/asan address,undefined
cmake --build build/asan -j "$jobs" > build/asan.build.log 2>&1 || { tail -50 build/asan.build.log; exit 1; }
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
echo "== ASan + UBSan: ctest =="
ctest --test-dir build/asan --output-on-failure
echo "== ASan + UBSan: the C++ example =="
cmake --install build/asan --prefix build/asan-install > /dev/null
cmake -S examples/cpp -B build/asan-example -DCMAKE_PREFIX_PATH="$PWD/build/asan-install" \
  -DCMAKE_CXX_FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer" \
  -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" > /dev/null
cmake --build build/asan-example -j "$jobs" > /dev/null
build/asan-example/shared_prefix > /dev/null
echo "example: ok"

echo "== TSan: build the host-tier and thread tests =="
configure build/tsan thread
cmake --build build/tsan -j "$jobs" --target test_host_tier test_kv_cache_threads > build/tsan.build.log 2>&1 \
  || { tail -50 build/tsan.build.log; exit 1; }
echo "== TSan: run =="
export TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1
ctest --test-dir build/tsan --output-on-failure -R '^(host_tier|kv_cache_threads)$'
echo "sanitize.sh: all passed in $(( $(date +%s) - t0 )) s"
