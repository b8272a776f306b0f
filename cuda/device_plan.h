// The device copy of a step plan, and the kernel argument blocks.
//
// The core's StepPlan is device-neutral (whole shared chunk runs, whole sequence row
// blocks). The CUDA backend cuts it into *items* for the GPU: an item is one
// work unit's row tile (token rows x the GQA group's query heads, stacked, at most 64)
// against a contiguous range of that unit's chunks. Each item writes one softmax partial
// (max, sum, unnormalised output) per stacked row; the backend numbers those partials
// itself and builds its own per-row merge lists (CSR). The unit decisions of the plan
// (chunk-first vs sequence-first, which rows, which chunks, causal or not) are kept.
//
// Everything is packed into one int32 buffer. Sections that a decode step that only
// bumps lengths changes (chunk_valid, row_slot, positions) come last, so refreshing the
// device copy is one cudaMemcpyAsync of the first..last changed word.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "chunkvale/config.h"
#include "chunkvale/detail/host_device.h"
#include "chunkvale/detail/pool_view.h"
#include "chunkvale/step_plan.h"

namespace chunkvale {
namespace cuda {

// One attention CTA's work (blockIdx.x); blockIdx.y is the KV head.
struct DevItem {
  int32_t chunk_begin;  // range into the chunk arrays (the plan's unit_chunks)
  int32_t chunk_end;
  int32_t row_begin;    // first token row of the tile: index into unit_rows
  int32_t n_tok;        // token rows in the tile; n_tok * group <= 16 * (4 / warps_n)
  int32_t pbase;        // first partial token-row of the tile
  int32_t flags;        // bit 0: causal; bits 1..3: warps_n (1, 2 or 4; see kernels)
  int32_t pad0, pad1;
};
static_assert(sizeof(DevItem) == 32, "DevItem is 8 int32");

constexpr int kItemCausal = 1;
CHUNKVALE_HD int item_warps_n(int flags) { return (flags >> 1) & 7; }

// Word offsets of the sections in the packed buffer (each 4-word aligned).
struct PlanLayout {
  int64_t items = 0, chunk_slot = 0, chunk_start = 0, unit_rows = 0, row_off = 0, row_parts = 0,
          row_slot = 0, chunk_valid = 0, positions = 0, total = 0;
  int32_t n_items = 0, n_chunks = 0, n_unit_rows = 0, n_merges = 0, num_tokens = 0;
  int32_t p_tok = 0;  // partial token-rows per KV head
  bool operator==(const PlanLayout& o) const;
};

struct PlanBuildParams {
  int chunk_size = 0;
  int group = 1;
  int kv_heads = 1;
  int sm_count = 1;  // multiprocessors of the device (sizes the chunk splits)
  int items_per_sm = 8;  // aim for about sm_count * items_per_sm CTAs per layer
  int min_piece = 4;     // chunks per item at least (when a unit's chunks are split)
  // A cache of `cfg` on a device of sm_count multiprocessors (default split knobs).
  static PlanBuildParams for_cache(const CacheConfig& cfg, int sm_count);
};

// Packs `plan` into `words` (resized) and fills `layout`. Pure host code.
void build_device_plan(const StepPlan& plan, const PlanBuildParams& p, std::vector<int32_t>& words,
                       PlanLayout& layout);

// Attention kernel arguments (by value).
struct AttnParams {
  const void* pool_layer;   // this layer's pool, read through `pool`
  const void* q;            // [num_tokens][q_heads][D]
  const DevItem* items;
  const int32_t* chunk_slot;
  const int32_t* chunk_start;
  const int32_t* chunk_valid;
  const int32_t* unit_rows;
  const int32_t* positions;
  float* part_ml;           // [kv_heads][p_tok * group][2]: (max in log2 units, sum)
  float* part_o;            // [kv_heads][p_tok * group][D]: unnormalised output
  PoolView pool;            // tile strides (elements)
  int32_t C, kv_heads, q_heads, group, p_tok;
  float scale_log2;         // sm_scale * log2(e)
};

struct MergeParams {
  const int32_t* row_off;   // [num_tokens + 1]
  const int32_t* row_parts; // partial token-rows per packed row
  const float* part_ml;
  const float* part_o;
  void* out;                // [num_tokens][out_heads][D], cache dtype
  float* lse;               // [num_tokens][out_heads] natural log, or null
  int32_t num_tokens, q_heads, group, p_tok, D;
  // Where the q_heads merged here sit in a row of out / lse: heads head0 .. head0 + q_heads
  // of out_heads (a per-KV-head run merges one group: q_heads = group, head0 = h * group).
  int32_t out_heads, head0;
};

// Per-KV-head plans (Backend::attention_per_head): the arguments of an every-head run
// narrowed to KV head `head` alone, as a cache of one KV head: its pool tiles (head_stride
// elements apart), its group's query heads and their place in out / lse; rows keep strides.
void restrict_to_head(AttnParams& ap, MergeParams& mp, int head, int64_t head_stride);

struct AppendParams {
  void* pool_layer;
  const void* k;            // [num_tokens][kv_heads][D]
  const void* v;
  const int32_t* row_slot;
  const int32_t* positions;
  PoolView pool;
  int32_t num_tokens, kv_heads, C, D;
};

}  // namespace cuda
}  // namespace chunkvale
