// One layer's two-phase attention on the CPU, over any pool a PoolView describes: the plan's
// units cut for a thread pool (thread_cuts.h, once per plan layout), phase 1 per (piece, KV
// head) into softmax partials, phase 2 the exact merge per row. The CPU backend runs it on
// its own pool, PagedAttention on a caller's.
#pragma once
#include <string>
#include <vector>

#include "kernels.h"
#include "thread_pool.h"

namespace chunkvale {

class CpuAttention {
 public:
  // Throws ValueError naming kernel_isa / head_dim when no kernel fits.
  CpuAttention(DType dtype, int head_dim, const std::string& kernel_isa, int threads);

  ThreadPool& threads() { return threads_; }
  const KernelTable& kernels() const { return *kernels_; }

  // `a` carries everything but the plan, its cuts and the partial buffers, which are set here.
  // Not reentrant (one thread pool).
  void run(const StepPlan& plan, LayerArgs a);

 private:
  const KernelTable* kernels_;
  ThreadPool threads_;
  std::vector<KernelScratch> scratch_;  // one per thread
  ThreadCuts cuts_;                     // the latest plan layout, cut for threads_
  std::vector<float> part_ml_, part_o_;
};

}  // namespace chunkvale
