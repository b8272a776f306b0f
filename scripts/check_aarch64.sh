#!/usr/bin/env bash
# The portable kernels on aarch64 without an ARM machine: cross-compile the C++ core and its
# unit tests (CUDA off), then run the tests under qemu's user-mode emulation.
# Needs Debian's g++-aarch64-linux-gnu and qemu-user (apt-get install -y g++-aarch64-linux-gnu qemu-user).
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build/aarch64 -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 \
  -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ -DCHUNKVALE_CUDA=OFF -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build/aarch64 -j "$(nproc 2>/dev/null || echo 2)"
for t in test_chunk_pool test_prefix_tree test_kv_cache_attention test_host_tier test_kernel_shared test_thread_cuts; do
  qemu-aarch64 -L /usr/aarch64-linux-gnu "build/aarch64/$t"
done
