// Pool kernels: append (the step's new K/V rows into their chunk slots) and copy_chunk.
// Header so that test_kernel_emulation.cpp runs the same source on the CPU (static: each
// including file gets its own copy).
#pragma once
#include <cstdint>

#include "device_plan.h"

namespace chunkvale {
namespace cuda {

// ---- append: the step's new K/V rows into their chunk slots (16-byte vectors) ----
static __global__ void append_kernel(const AppendParams p) {
  const int vpr = p.D / 8;  // 16-byte vectors per head row
  const int64_t total = int64_t(p.num_tokens) * p.kv_heads * vpr;
  const int64_t tile = int64_t(p.C) * p.D;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int c = int(i % vpr);
    const int64_t rh = i / vpr;
    const int h = int(rh % p.kv_heads);
    const int r = int(rh / p.kv_heads);
    const int pos = p.positions[r];
    const int64_t dst = int64_t(p.row_slot[r]) * p.slot_stride + int64_t(h) * tile +
                        int64_t(pos & (p.C - 1)) * p.D + c * 8;
    const int64_t src = rh * p.D + c * 8;
    uint16_t* pool = static_cast<uint16_t*>(p.pool_layer);
    *reinterpret_cast<uint4*>(pool + dst) = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p.k) + src);
    *reinterpret_cast<uint4*>(pool + dst + int64_t(p.kv_heads) * tile) =
        *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p.v) + src);
  }
}

// ---- copy_chunk: first n tokens of slot src into dst, every layer, K/V and head ----
struct CopyParams {
  uint16_t* pool;
  int64_t slot_stride, layer_stride, tile;  // elements
  int32_t src, dst, n_tokens, tiles_per_slot, layers, D;
};
static __global__ void copy_chunk_kernel(const CopyParams p) {
  const int vpt = p.n_tokens * (p.D / 8);  // vectors per tile prefix
  const int64_t total = int64_t(p.layers) * p.tiles_per_slot * vpt;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int v = int(i % vpt);
    const int64_t lt = i / vpt;
    const int t = int(lt % p.tiles_per_slot);
    const int l = int(lt / p.tiles_per_slot);
    const int64_t base = int64_t(l) * p.layer_stride + int64_t(t) * p.tile + int64_t(v) * 8;
    *reinterpret_cast<uint4*>(p.pool + base + int64_t(p.dst) * p.slot_stride) =
        *reinterpret_cast<const uint4*>(p.pool + base + int64_t(p.src) * p.slot_stride);
  }
}

}  // namespace cuda
}  // namespace chunkvale
