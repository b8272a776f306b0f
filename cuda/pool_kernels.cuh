// Pool kernels: append (the step's new K/V rows into their chunk slots) and copy_chunk,
// both addressing tiles through the pool view (pool_view.h) in 16-byte vectors.
// Header so that test_kernel_emulation.cpp runs the same source on the CPU (static: each
// including file gets its own copy).
#pragma once
#include <cstdint>

#include "device_plan.h"
#include "kernel_env.cuh"

namespace chunkvale {
namespace cuda {

// Calls f(i) for every i in [0, total), spread over the grid's threads (grid-stride loop).
template <class F>
__device__ __forceinline__ void grid_stride(int64_t total, F&& f) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x)
    f(i);
}

__device__ __forceinline__ void copy16(uint16_t* dst, const uint16_t* src) {
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
}

// ---- append: the step's new K/V rows into their chunk slots ----
static __global__ void append_kernel(const AppendParams p) {
  const int vpr = p.D / 8;  // 16-byte vectors per head row
  uint16_t* pool = static_cast<uint16_t*>(p.pool_layer);
  grid_stride(int64_t(p.num_tokens) * p.kv_heads * vpr, [&](int64_t i) {
    const int c = int(i % vpr);
    const int64_t rh = i / vpr;  // (row, head), row-major as the k / v inputs
    const int h = int(rh % p.kv_heads);
    const int r = int(rh / p.kv_heads);
    const int64_t at = int64_t(p.positions[r] & (p.C - 1)) * p.D + c * 8;
    const int64_t src = rh * p.D + c * 8;
    copy16(pool + p.pool.tile(p.row_slot[r], 0, h) + at, static_cast<const uint16_t*>(p.k) + src);
    copy16(pool + p.pool.tile(p.row_slot[r], 1, h) + at, static_cast<const uint16_t*>(p.v) + src);
  });
}

// ---- copy_chunk: first n tokens of slot src into dst, every layer, K/V and head ----
struct CopyParams {
  uint16_t* pool;
  PoolView view;         // a layer's tiles
  int64_t layer_stride;  // elements between layers (0 with one layer)
  int32_t src, dst, n_tokens, layers, kv_heads;
};
static __global__ void copy_chunk_kernel(const CopyParams p) {
  const int H = p.kv_heads;
  const int vpt = p.n_tokens * (p.view.D / 8);  // vectors per tile prefix
  grid_stride(int64_t(p.layers) * 2 * H * vpt, [&](int64_t i) {
    const int v = int(i % vpt);
    const int64_t lt = i / vpt;
    const int t = int(lt % (2 * H));  // K tiles of every head, then V tiles
    const int l = int(lt / (2 * H));
    const int64_t base = int64_t(l) * p.layer_stride + int64_t(v) * 8;
    copy16(p.pool + base + p.view.tile(p.dst, t / H, t % H), p.pool + base + p.view.tile(p.src, t / H, t % H));
  });
}

}  // namespace cuda
}  // namespace chunkvale
