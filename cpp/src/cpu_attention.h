// One layer's two-phase attention on the CPU, over any pool a PoolView describes: the plan's
// units cut for a thread pool (thread_cuts.h, once per plan layout), phase 1 per (piece, KV
// head) into softmax partials, phase 2 the exact merge per row. The CPU backend runs it on
// its own pool, PagedAttention on a caller's.
#pragma once
#include <string>
#include <vector>

#include "chunkvale/backend.h"
#include "kernels.h"
#include "thread_pool.h"

namespace chunkvale {

class CpuAttention {
 public:
  // Throws ValueError naming kernel_isa / head_dim when no kernel fits.
  CpuAttention(DType dtype, int head_dim, const std::string& kernel_isa, int threads,
               const std::vector<int>& cpus = {});
  // With a kernel table of the caller's (tests: the same kernel source built for an emulated
  // instruction set).
  CpuAttention(const KernelTable& kernels, int threads);

  ThreadPool& threads() { return threads_; }
  const KernelTable& kernels() const { return *kernels_; }

  // `a` carries everything but the plan, its cuts and the partial buffers, which are set here.
  // Not reentrant (one thread pool).
  void run(const StepPlan& plan, LayerArgs a);
  // Per-KV-head selection: KV head h (and its query heads) attends as plans[h] says, one
  // run per head; `a` as for run, `elem_bytes` the cache dtype's size.
  void run_per_head(const StepPlan* plans, const LayerArgs& a, size_t elem_bytes);

  // Budgeted attention's ranking: per request, the indices (into its slots) of its k best
  // candidates by digest bound (the score kernel, or with proto.per_kv_head head_scores.h
  // and kv_heads lists of k; ties by top_k.h), best first, into requests[r].top. `proto` carries the digests, their view, the shape and the kind; the
  // request's query row starts at q + row * q_row_bytes. Not reentrant.
  void top_chunks(const ScoreArgs& proto, const uint8_t* q, size_t q_row_bytes, const Digests::ScoreRequest* requests,
                  size_t count, int k);

 private:
  const KernelTable* kernels_;
  ThreadPool threads_;
  std::vector<KernelScratch> scratch_;  // one per thread
  ThreadCuts cuts_;                     // the latest plan layout, cut for threads_
  std::vector<float> part_ml_, part_o_;
  std::vector<float> head_lse_;                          // run_per_head: one head's lse
  std::vector<std::vector<float>> score_q_;             // per thread: the pooled query
  std::vector<std::pair<size_t, size_t>> score_items_;  // (request, first candidate) pieces
  std::vector<size_t> score_first_;                     // each request's first score
  std::vector<float> scores_;
  std::vector<uint64_t> heap_;
};

}  // namespace chunkvale
