// Chunk selection for budgeted attention: per layer, each decoding sequence over budget
// keeps its sinks, its recent window and the top-k chunks by digest score for its query
// (SelectionRule decides who selects); the layer's plan is rebuilt over the kept chunks:
// one plan for every KV head (shared selection), or with per-KV-head selection one plan per
// KV head, each over that head's own top-k. After a prefill, the chunks an over-budget
// sequence would not select are named, so the host tier can make them its first eviction
// victims.
#pragma once
#include <cstdint>
#include <vector>

#include "chunkvale/backend.h"
#include "chunkvale/cache_stats.h"
#include "selection_rule.h"
#include "step.h"

namespace chunkvale {

// One layer's attention plans after selection: plans[0] for every KV head, or with
// `per_head` plans[h] for KV head h (kv_heads of them). `plans` null: nothing was dropped,
// the step's plan stands.
struct LayerPlans {
  const StepPlan* plans = nullptr;
  bool per_head = false;
};

// Ranks one layer's candidates for the selector, as Digests::top_chunks does, bound by its
// caller to the call's layer, query rows and digests: the selector holds no scoring state.
class ChunkScorer {
 public:
  virtual void top_chunks(const Digests::ScoreRequest* requests, size_t count, int k) = 0;

 protected:
  ~ChunkScorer() = default;
};

// A backend's digests for one layer and one step's queries (KVCache's stores).
class BackendScorer final : public ChunkScorer {
 public:
  BackendScorer(Digests& digests, int layer, const TensorView& q, const ExecContext& ctx)
      : digests_(digests), layer_(layer), q_(q), ctx_(ctx) {}
  void top_chunks(const Digests::ScoreRequest* requests, size_t count, int k) override {
    digests_.top_chunks(layer_, q_, requests, count, k, ctx_);
  }

 private:
  Digests& digests_;
  int layer_;
  const TensorView& q_;
  const ExecContext& ctx_;
};

class ChunkSelector {
 public:
  // Chunks of `chunk_size` tokens; `kv_heads` plans per layer with per-KV-head selection.
  // KVCache and PagedAttention (blocks for chunks) both select here.
  ChunkSelector(const EvictionConfig& eviction, int chunk_size, int kv_heads, const PlanParams& params);

  // This layer's plans over the kept chunks, candidates ranked by `scorer`. Valid until the
  // next call. `decodes[i]`: plan.seqs[i] is a decode row (SelectionRule::decodes).
  LayerPlans select(const StepPlan& plan, const uint8_t* decodes, ChunkScorer& scorer);
  LayerPlans select(const PlannedStep& step, ChunkScorer& scorer);
  // Plans per layer: kv_heads with per-KV-head selection (and a top-k), else 1.
  int units() const { return units_; }
  // The chunks (ids) of prefill / extend rows, over budget from their next decode step on,
  // that their last prompt token would not select (that no KV head would).
  const std::vector<int32_t>& unselected_after_prefill(const PlannedStep& step, ChunkScorer& scorer);

  const CacheStats& counts() const { return counts_; }  // part_counts.h

 private:
  void top_requests(ChunkScorer& scorer);  // score_reqs_ -> top_

  // Marks request r's kept candidates (any unit's) in taken_ [r.n].
  void mark_taken(const Digests::ScoreRequest& r);

  const PlanParams& params_;
  SelectionRule rule_;
  int units_;                      // plans per layer (1 or kv_heads)
  std::vector<StepPlan> layer_plans_;  // one per unit
  std::vector<std::vector<uint8_t>> keep_;  // [unit * B + seq]
  std::vector<PlanSeqInput> inputs_;
  std::vector<int32_t> top_;  // units * k per request
  std::vector<uint8_t> taken_, decodes_;
  std::vector<Digests::ScoreRequest> score_reqs_;
  std::vector<int32_t> cand_lo_, unselected_;
  CacheStats counts_;  // chunks scored and dropped, time selecting and scoring
};

}  // namespace chunkvale
