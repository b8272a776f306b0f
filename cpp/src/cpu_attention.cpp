#include "cpu_attention.h"

#include <algorithm>

#include "chunkvale/errors.h"
#include "top_k.h"

namespace chunkvale {

CpuAttention::CpuAttention(DType dtype, int head_dim, const std::string& kernel_isa, int threads,
                           const std::vector<int>& cpus)
    : kernels_(kernels_for(dtype, head_dim, kernel_isa)), threads_(threads, cpus) {
  if (!kernels_)
    throw ValueError("head_dim: expected 64, 80, 96, 128 or 256, got " + std::to_string(head_dim));
  scratch_.resize(size_t(threads_.size()));
}

CpuAttention::CpuAttention(const KernelTable& kernels, int threads) : kernels_(&kernels), threads_(threads, {}) {
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

void CpuAttention::top_chunks(const ScoreArgs& proto, const uint8_t* q, size_t q_row_bytes,
                              const Digests::ScoreRequest* requests, size_t count, int k) {
  std::vector<size_t>& first = score_first_;  // each request's first score
  first.assign(count + 1, 0);
  for (size_t r = 0; r < count; ++r) first[r + 1] = first[r] + requests[r].n;
  scores_.resize(first[count]);
  const size_t qf = size_t(proto.kv_heads) * (2 * size_t(proto.D) + 1);
  score_q_.resize(size_t(threads_.size()));
  for (auto& s : score_q_)
    if (s.size() < qf) s.resize(qf);
  // Pieces of at most kPiece candidates, so one long sequence still spreads over the
  // threads; reading digests is memory-bound.
  constexpr size_t kPiece = 128;
  score_items_.clear();
  for (size_t r = 0; r < count; ++r)
    for (size_t c = 0; c < requests[r].n; c += kPiece) score_items_.emplace_back(r, c);
  threads_.parallel_for(int64_t(score_items_.size()), [&](int64_t i, int t) {
    const auto [r, c0] = score_items_[size_t(i)];
    const Digests::ScoreRequest& req = requests[r];
    ScoreArgs a = proto;
    a.q = q + size_t(req.row) * q_row_bytes;
    a.slots = req.slots + c0;
    a.n = std::min(kPiece, req.n - c0);
    a.scores = scores_.data() + first[r] + c0;
    a.qf = score_q_[size_t(t)].data();
    kernels_->score_chunks(a);
  });
  for (size_t r = 0; r < count; ++r)
    top_k(scores_.data() + first[r], requests[r].n, size_t(std::max(k, 0)), requests[r].top, heap_);
}

}  // namespace chunkvale
