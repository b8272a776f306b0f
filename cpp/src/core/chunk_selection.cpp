#include "chunk_selection.h"

#include <algorithm>
#include <chrono>

#include "plan_builder.h"

namespace chunkvale {

namespace {
int64_t ns_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

ChunkSelector::ChunkSelector(const EvictionConfig& eviction, int chunk_size, int kv_heads, const PlanParams& params)
    : params_(params), rule_(eviction, chunk_size),
      // Without a top-k every head keeps the same sinks + window: one plan serves them all.
      units_(eviction.per_kv_head() && rule_.topk > 0 ? kv_heads : 1), layer_plans_(size_t(units_)) {}

// The top-k candidates of every request of score_reqs_, by digest score (the scorer
// scores and ranks: top_k.h's rule), into top_ (units lists of k per request, best first).
void ChunkSelector::top_requests(ChunkScorer& scorer) {
  const size_t k = size_t(std::max(rule_.topk, 0)) * size_t(units_);
  top_.resize(score_reqs_.size() * k);
  for (size_t i = 0; i < score_reqs_.size(); ++i) score_reqs_[i].top = top_.data() + i * k;
  auto t0 = std::chrono::steady_clock::now();
  scorer.top_chunks(score_reqs_.data(), score_reqs_.size(), rule_.topk);
  counts_.evict_score_ns += ns_since(t0);
}

const std::vector<int32_t>& ChunkSelector::unselected_after_prefill(const PlannedStep& step, ChunkScorer& scorer) {
  const StepPlan& plan = step.plan;
  unselected_.clear();
  score_reqs_.clear();
  for (size_t i = 0; i < plan.seqs.size(); ++i) {
    const StepSeq& s = plan.seqs[i];
    // Prefill / extend rows whose sequence selects from its next decode step on.
    const SelectionRule::Range r = rule_.of(true, s.total(), s.chunk_end - s.chunk_begin);
    if (step.decodes(i) || !r.selects) continue;
    Digests::ScoreRequest req;
    req.row = s.row_begin + s.n_new - 1;
    req.slots = plan.seq_chunks.data() + s.chunk_begin + r.lo;  // full chunks: their digests exist
    req.n = size_t(r.hi - r.lo);
    score_reqs_.push_back(req);
  }
  if (score_reqs_.empty()) return unselected_;
  top_requests(scorer);
  for (const Digests::ScoreRequest& r : score_reqs_) {
    mark_taken(r);
    for (size_t c = 0; c < r.n; ++c)
      if (!taken_[c]) unselected_.push_back(r.slots[c]);
  }
  return unselected_;
}

void ChunkSelector::mark_taken(const Digests::ScoreRequest& r) {
  taken_.assign(r.n, 0);
  for (int j = 0; j < rule_.topk * units_; ++j) taken_[size_t(r.top[j])] = 1;
}

LayerPlans ChunkSelector::select(const PlannedStep& step, ChunkScorer& scorer) {
  decodes_.resize(step.plan.seqs.size());
  for (size_t i = 0; i < decodes_.size(); ++i) decodes_[i] = step.decodes(i);
  return select(step.plan, decodes_.data(), scorer);
}

LayerPlans ChunkSelector::select(const StepPlan& plan, const uint8_t* decodes, ChunkScorer& scorer) {
  auto t0 = std::chrono::steady_clock::now();
  const size_t B = plan.seqs.size(), U = size_t(units_);
  keep_.resize(U * B);
  score_reqs_.clear();
  cand_lo_.assign(B, -1);
  for (size_t i = 0; i < B; ++i) {
    const StepSeq& s = plan.seqs[i];
    const int32_t nch = s.chunk_end - s.chunk_begin;
    for (size_t u = 0; u < U; ++u) keep_[u * B + i].assign(size_t(nch), 1);
    const SelectionRule::Range r = rule_.of(decodes[i] != 0, s.total(), nch);
    if (!r.selects) continue;  // prefill, extend and sequences within budget attend to everything
    cand_lo_[i] = int32_t(r.lo);
    Digests::ScoreRequest req;
    req.row = s.row_begin;
    req.slots = plan.seq_chunks.data() + s.chunk_begin + r.lo;
    req.n = size_t(r.hi - r.lo);
    score_reqs_.push_back(req);
  }
  const bool any = !score_reqs_.empty();
  if (any) {
    top_requests(scorer);
    for (size_t i = 0, k = 0; i < B; ++i) {
      if (cand_lo_[i] < 0) continue;
      const Digests::ScoreRequest& r = score_reqs_[k++];
      const int32_t lo = cand_lo_[i];
      for (size_t u = 0; u < U; ++u) {  // unit u's list: r.top + u * topk
        auto& keep = keep_[u * B + i];
        for (size_t c = 0; c < r.n; ++c) keep[size_t(lo) + c] = 0;
        for (int32_t j = 0; j < rule_.topk; ++j) keep[size_t(lo + r.top[u * size_t(rule_.topk) + size_t(j)])] = 1;
      }
      // Dropped: candidates no head attends.
      mark_taken(r);
      counts_.evict_scored_chunks += int64_t(r.n);
      counts_.evict_dropped_chunks += int64_t(std::count(taken_.begin(), taken_.end(), uint8_t(0)));
    }
    inputs_.resize(B);
    for (size_t u = 0; u < U; ++u) {
      for (size_t i = 0; i < B; ++i) {
        const StepSeq& s = plan.seqs[i];
        PlanSeqInput& in = inputs_[i];
        in.id = s.seq_id;
        in.n_new = s.n_new;
        in.ctx_before = s.ctx_before;
        in.slots = plan.seq_chunks.data() + s.chunk_begin;
        in.n_chunks = s.chunk_end - s.chunk_begin;
        in.n_shared = s.n_shared;
        in.keep = keep_[u * B + i].data();
      }
      StepPlan& lp = layer_plans_[u];
      plan_step(lp, inputs_, params_);
      lp.id = plan.id;
      new_revision(lp);
    }
  }
  counts_.evict_select_ns += ns_since(t0);
  if (!any) return {};
  return {layer_plans_.data(), units_ > 1};
}

}  // namespace chunkvale
