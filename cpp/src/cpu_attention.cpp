#include "cpu_attention.h"

#include "chunkvale/errors.h"

namespace chunkvale {

CpuAttention::CpuAttention(DType dtype, int head_dim, const std::string& kernel_isa, int threads)
    : kernels_(kernels_for(dtype, head_dim, kernel_isa)), threads_(threads) {
  if (!kernels_)
    throw ValueError("head_dim: expected 64, 80, 96, 128 or 256, got " + std::to_string(head_dim));
  scratch_.resize(size_t(threads_.size()));
}

void CpuAttention::run(const StepPlan& plan, LayerArgs a) {
  // Every layer of a step shares one cut, and decode steps that only bump the plan keep it.
  if (cuts_.plan_layout != plan.layout || plan.layout == 0)
    cut_for_threads(plan, threads_.size(), a.kv_heads, cuts_);
  const size_t prow = size_t(a.kv_heads) * size_t(cuts_.partial_rows) * size_t(a.group);
  if (part_ml_.size() < prow * 2) part_ml_.resize(prow * 2);
  if (part_o_.size() < prow * size_t(a.D)) part_o_.resize(prow * size_t(a.D));
  a.plan = &plan;
  a.cuts = &cuts_;
  a.part_ml = part_ml_.data();
  a.part_o = part_o_.data();

  // Phase 1: every (piece, KV head); chunk-first pieces come first, so the biggest items
  // start early and the dynamic schedule balances the tail.
  const int H = a.kv_heads;
  const int64_t items = int64_t(cuts_.pieces.size()) * H;
  threads_.parallel_for(items, [&](int64_t i, int t) {
    kernels_->run_piece(a, int32_t(i / H), int(i % H), scratch_[size_t(t)]);
  });
  // Phase 2: merge each row's partials (exact log-sum-exp combination).
  threads_.parallel_for(plan.num_tokens, [&](int64_t r, int) { kernels_->merge_row(a, int32_t(r)); });
}

}  // namespace chunkvale
