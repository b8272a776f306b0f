// The one CPU executor: everything that touches K/V on the CPU, over any pool a PoolView
// describes (CpuBackend's own pool, a caller's paged pool). It writes rows by slot,
// refreshes block digests, scores candidates against digests and runs a layer's two-phase
// attention: the plan's units cut for a thread pool (thread_cuts.h, once per plan layout),
// phase 1 per (piece, KV head) into softmax partials, phase 2 the exact merge per row.
// CpuBackend and PagedAttention are fronts: they say where the pool is and what to run.
#pragma once
#include <cstring>
#include <string>
#include <vector>

#include "chunkvale/backend.h"
#include "kernels.h"
#include "thread_pool.h"

namespace chunkvale {

// One layer of a pool: its first byte and how its tiles lie (elements of the cache dtype).
struct LayerPool {
  uint8_t* base = nullptr;
  PoolView view;
  int kv_heads = 0;
  size_t elem = 0;  // bytes per element
  uint8_t* tile(int64_t slot, int kv, int head) const { return base + size_t(view.tile(slot, kv, head)) * elem; }
};

// Packed rows of one tensor of the step: row t, KV head h starts at
// data + (t * row + h * head_dim) * elem (heads and dims contiguous, rows may be strided).
struct PackedRows {
  const uint8_t* data = nullptr;
  int64_t row = 0;  // elements between rows
};

// A layer's attention arguments (everything but the plan, its cuts and the partials).
LayerArgs layer_args(const LayerPool& pool, const AttentionShape& shape, const void* q, int64_t q_row, void* out,
                     int64_t out_row, float* lse);
// A layer's scoring arguments: its digests (`layer_digests`, viewed by `view`) and the rules.
ScoreArgs score_args(const AttentionShape& shape, const float* layer_digests, const DigestView& view,
                     const EvictionConfig& eviction);

class CpuExecutor {
 public:
  // Throws ValueError naming kernel_isa / head_dim when no kernel fits.
  CpuExecutor(DType dtype, int head_dim, const std::string& kernel_isa, int threads,
              const std::vector<int>& cpus = {});
  // With a kernel table of the caller's (tests: the same kernel source built for an emulated
  // instruction set).
  CpuExecutor(const KernelTable& kernels, int threads);

  ThreadPool& threads() { return threads_; }
  const KernelTable& kernels() const { return *kernels_; }

  // Writes n rows of k and v into the pool: row t to dest(t) = slot * C + offset, or skips it
  // when dest(t) < 0 (padding). Rows are independent: large writes spread over the threads.
  template <class Dest>
  void write_rows(const LayerPool& pool, const PackedRows& k, const PackedRows& v, int64_t n, Dest&& dest);

  // Recomputes digests from the pool: for i < n and every KV head, the keys of slot slots[i]
  // into digest entry ids[i] of `digests` (one layer, viewed by `view`), as `kind` says.
  void refresh_digests(const LayerPool& pool, DType dtype, DigestKind kind, float* digests, const DigestView& view,
                       const int32_t* ids, const int32_t* slots, size_t n);

  // `a` carries everything but the plan, its cuts and the partial buffers, which are set here.
  // Not reentrant (one thread pool).
  void run(const StepPlan& plan, LayerArgs a);
  // Per-KV-head selection: KV head h (and its query heads) attends as plans[h] says, one
  // run per head; `a` as for run, `elem_bytes` the cache dtype's size.
  void run_per_head(const StepPlan* plans, const LayerArgs& a, size_t elem_bytes);

  // Budgeted attention's ranking: per request, the indices (into its slots) of its k best
  // candidates by digest bound (the score kernel, or with proto.per_kv_head head_scores.h
  // and kv_heads lists of k; ties by top_k.h), best first, into requests[r].top. `proto`
  // carries the digests, their view, the shape and the kind; the request's query row starts
  // at q + row * q_row_bytes. Not reentrant.
  void top_chunks(const ScoreArgs& proto, const uint8_t* q, size_t q_row_bytes, const Digests::ScoreRequest* requests,
                  size_t count, int k);

 private:
  const KernelTable* kernels_;
  ThreadPool threads_;
  std::vector<KernelScratch> scratch_;  // one per thread
  ThreadCuts cuts_;                     // the latest plan layout, cut for threads_
  std::vector<float> part_ml_, part_o_;
  std::vector<float> head_lse_;                          // run_per_head: one head's lse
  std::vector<std::vector<float>> keys_;                // per thread: one K tile as float32
  std::vector<std::vector<float>> score_q_;             // per thread: the pooled query
  std::vector<std::pair<size_t, size_t>> score_items_;  // (request, first candidate) pieces
  std::vector<size_t> score_first_;                     // each request's first score
  std::vector<float> scores_;
  std::vector<uint64_t> heap_;
};

template <class Dest>
void CpuExecutor::write_rows(const LayerPool& pool, const PackedRows& k, const PackedRows& v, int64_t n,
                             Dest&& dest) {
  const int64_t D = pool.view.D;
  const size_t row_bytes = size_t(D) * pool.elem;
  auto write_row = [&](int64_t t, int) {
    const int64_t s = dest(t);
    if (s < 0) return;
    const int64_t slot = s / pool.view.C, r = s % pool.view.C;
    for (int h = 0; h < pool.kv_heads; ++h) {
      const size_t off = size_t(r) * row_bytes;
      std::memcpy(pool.tile(slot, 0, h) + off, k.data + size_t(t * k.row + h * D) * pool.elem, row_bytes);
      std::memcpy(pool.tile(slot, 1, h) + off, v.data + size_t(t * v.row + h * D) * pool.elem, row_bytes);
    }
  };
  // Below this a step's rows cost less than waking the threads.
  if (n >= 512)
    threads_.parallel_for(n, write_row);
  else
    for (int64_t t = 0; t < n; ++t) write_row(t, 0);
}

}  // namespace chunkvale
