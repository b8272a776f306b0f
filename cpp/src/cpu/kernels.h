// CPU attention kernels, compiled once per instruction set (kernels_*.cpp) from one
// source (attention_kernels.inc); kernels_dispatch.cpp picks the best the CPU runs.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "chunkvale/config.h"
#include "chunkvale/detail/pool_view.h"
#include "chunkvale/step_plan.h"
#include "thread_cuts.h"

namespace chunkvale {

// Per-thread scratch, grown on demand and reused across calls.
struct KernelScratch {
  std::vector<float> q;       // the unit's stacked queries (transposed in the lanes path)
  std::vector<float> s;       // scores / probabilities of one chunk
  std::vector<float> o;       // output accumulators (transposed in the lanes path)
  std::vector<float> ml;      // running (max, sum) per stacked row
  std::vector<float> kf, vf;  // a chunk's K and V widened to fp32 (fp16 / bf16 storage)
  std::vector<uint16_t> qh;   // queries as bf16 pairs (the BF16 dot-product path)
  std::vector<int64_t> pos;   // position of each stacked row
};

// One layer's attention inputs as the kernels see them.
struct LayerArgs {
  const StepPlan* plan = nullptr;
  const ThreadCuts* cuts = nullptr;     // the plan's pieces, partials and merge lists
  const uint8_t* layer_base = nullptr;  // this layer's pool, read through `pool`
  PoolView pool;                        // (elements of the cache dtype)
  int C = 0, D = 0, kv_heads = 0, group = 0, q_heads = 0;
  float scale = 1.0f;
  const void* q = nullptr;    // [rows][q_heads][D], cache dtype; heads and D contiguous
  void* out = nullptr;        // same shape and dtype
  int64_t q_row = 0, out_row = 0;  // elements between packed rows (a caller's q may be a view)
  float* lse = nullptr;       // [rows][q_heads] or null
  float* part_ml = nullptr;   // [kv_heads][cuts->partial_rows * group][2] (max, sum)
  float* part_o = nullptr;    // [kv_heads][cuts->partial_rows * group][D]
};

// Scoring one query row's chunks against their digests (budgeted attention).
struct ScoreArgs {
  const float* digests = nullptr;  // this layer's digests, read through `digest`
  DigestView digest;
  int D = 0, kv_heads = 0, group = 0;
  const void* q = nullptr;         // the row: [q_heads][D], cache dtype
  const int32_t* slots = nullptr;
  size_t n = 0;
  DigestKind kind = DigestKind::CuboidMax;
  float* scores = nullptr;         // n
  float* qf = nullptr;             // scratch: kv_heads * (2 D + 1) floats
  // Per-KV-head selection (EvictionConfig::per_kv_head): scored per KV head by the host
  // scorer (head_scores.h) instead of score_chunks, the query read as `dtype`.
  bool per_kv_head = false;
  DType dtype = DType::Float32;
};

struct KernelTable {
  const char* isa;
  // Phase 1: one piece (ThreadCuts) for one KV head -> softmax partials.
  void (*run_piece)(const LayerArgs&, int32_t piece, int kv_head, KernelScratch&);
  // Phase 2: merge a packed row's partials for every query head -> out (and lse).
  void (*merge_row)(const LayerArgs&, int32_t row);
  void (*score_chunks)(const ScoreArgs&);
};

// The kernels for `isa` ("" = the best this CPU runs); throws ValueError naming
// kernel_isa when it is unknown or this CPU cannot run it.
const KernelTable* kernels_for(DType dtype, int head_dim, const std::string& isa = "");
const char* kernel_isa();                 // the best this CPU runs
std::vector<std::string> kernel_isas();   // every one this CPU runs, best first
// Every instruction set chunkvale knows, best first, with why it does not run here ("" when
// it does): not built, missing from the CPU, or (AMX) tile state refused by the kernel.
std::vector<std::pair<std::string, std::string>> kernel_isa_report();

namespace generic { const KernelTable* table(DType dtype, int head_dim); }
namespace avx2 { const KernelTable* table(DType dtype, int head_dim); }
namespace avx512 { const KernelTable* table(DType dtype, int head_dim); }
namespace avx512bf16 { const KernelTable* table(DType dtype, int head_dim); }
namespace amx_bf16 { const KernelTable* table(DType dtype, int head_dim); }

}  // namespace chunkvale
