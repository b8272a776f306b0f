// Where K/V and digests live: one stride-aware view of a layer's KV pool (in the spirit of
// FlashInfer's paged_kv_t), shared by the CPU kernels, the CUDA kernels and the backends'
// host code, so that every offset into a pool is computed here.
//
// A pool holds, per (slot, K or V, KV head), a tile of chunk_size token rows of head_dim
// contiguous elements. The strides between tiles are the view's: chunkvale's own pools are
// [slots][2][kv_heads][C][D] (chunkvale_layout), and a pool someone else allocated with
// another block layout is a different set of strides over the same tiles, e.g. vLLM's CPU
// cache [blocks][kv_heads][2 * block_size][D] (K rows then V rows of each block and head).
// Kernels reach K/V only through the view; what they assume is the tile: C rows of D.
#pragma once
#include <cstddef>
#include <cstdint>

#include "chunkvale/detail/host_device.h"

namespace chunkvale {

struct PoolView {
  int64_t slot_stride = 0;  // elements between slots (chunks, blocks)
  int64_t kv_stride = 0;    // between a slot's K tile and its V tile of the same head
  int64_t head_stride = 0;  // between KV heads
  int32_t C = 0, D = 0;     // rows per tile (chunk_size), elements per row (head_dim)

  // chunkvale's pools: [slots][2][kv_heads][C][D].
  CHUNKVALE_HD static PoolView chunkvale_layout(int kv_heads, int C, int D) {
    const int64_t tile = int64_t(C) * D;
    return {2 * int64_t(kv_heads) * tile, int64_t(kv_heads) * tile, tile, C, D};
  }
  // vLLM's CPU cache, one layer: [blocks][kv_heads][2 * block_size][D].
  CHUNKVALE_HD static PoolView vllm_cpu_layout(int kv_heads, int block_size, int D) {
    const int64_t tile = int64_t(block_size) * D;
    return {2 * int64_t(kv_heads) * tile, tile, 2 * tile, block_size, D};
  }

  CHUNKVALE_HD int64_t tile_elems() const { return int64_t(C) * D; }
  CHUNKVALE_HD int64_t slot_elems() const { return slot_stride; }
  // First element of the (slot, kv = 0 K / 1 V, head) tile; row r of it is + r * D.
  CHUNKVALE_HD int64_t tile(int64_t slot, int kv, int head) const {
    return slot * slot_stride + int64_t(kv) * kv_stride + int64_t(head) * head_stride;
  }
  CHUNKVALE_HD int64_t row(int64_t slot, int kv, int head, int64_t r) const {
    return tile(slot, kv, head) + r * D;
  }
  template <class T>
  CHUNKVALE_HD T* k_tile(T* layer, int64_t slot, int head) const { return layer + tile(slot, 0, head); }
  template <class T>
  CHUNKVALE_HD T* v_tile(T* layer, int64_t slot, int head) const { return layer + tile(slot, 1, head); }
};

// Per-layer starts in a pool of several layers (elements), where layers may hold different
// slot counts (a layer that evicts to the host holds only its device slots).
// slots_of(l) gives layer l's slot count; offsets gets layers + 1 entries (the last: total).
template <class SlotsOf, class Vec>
inline void layer_offsets(int layers, int64_t slot_elems, SlotsOf&& slots_of, Vec& offsets) {
  offsets.clear();
  size_t total = 0;
  for (int l = 0; l < layers; ++l) {
    offsets.push_back(total);
    total += size_t(slots_of(l)) * size_t(slot_elems);
  }
  offsets.push_back(total);
}

// Chunk digests (budgeted attention): per (layer, chunk, KV head) two float32 D-vectors,
// [layers][chunks][kv_heads][2][D].
struct DigestView {
  int64_t chunks = 0;  // per layer
  int32_t kv_heads = 0, D = 0;
  CHUNKVALE_HD int64_t head_elems() const { return 2 * int64_t(D); }
  CHUNKVALE_HD int64_t chunk_elems() const { return int64_t(kv_heads) * head_elems(); }
  CHUNKVALE_HD int64_t layer_elems() const { return chunks * chunk_elems(); }
  CHUNKVALE_HD int64_t layer(int l) const { return int64_t(l) * layer_elems(); }
  // Within a layer: the first of the two vectors of (chunk, head).
  CHUNKVALE_HD int64_t at(int64_t chunk, int head) const { return chunk * chunk_elems() + int64_t(head) * head_elems(); }
};

}  // namespace chunkvale
