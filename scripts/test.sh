#!/usr/bin/env bash
# The whole test suite: C++ unit tests (ctest), the C++ example built against the
# installed CMake package, and the Python tests. Run inside an environment where
# `pip install -e ".[test,hf]"` was done (see README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc 2>/dev/null || echo 2)

echo "== C++ core: build, ctest =="
cmake -S . -B build/cpp -DCMAKE_BUILD_TYPE=Release -DCHUNKVALE_TESTS=ON > build-cpp-configure.log 2>&1 \
  || { cat build-cpp-configure.log; exit 1; }
rm -f build-cpp-configure.log
cmake --build build/cpp -j "$jobs"
ctest --test-dir build/cpp --output-on-failure

echo "== C++ example against the installed package =="
cmake --install build/cpp --prefix build/install > /dev/null
cmake -S examples/cpp -B build/example -DCMAKE_PREFIX_PATH="$PWD/build/install" > /dev/null
cmake --build build/example -j "$jobs"
build/example/shared_prefix

echo "== Python tests =="
python -m pytest tests -q -p no:cacheprovider "$@"

echo "== chunkvale inside vLLM (its own environment) =="
bash scripts/test_vllm.sh
