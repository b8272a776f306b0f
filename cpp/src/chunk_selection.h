// Chunk selection for budgeted attention: per layer, each decoding sequence over budget
// keeps its sinks, its recent window and the top-k chunks by digest score for its query
// (SelectionRule decides who selects); the layer's plan is rebuilt over the kept chunks.
// After a prefill, the chunks an over-budget sequence would not select are named, so the
// host tier can make them its first eviction victims.
#pragma once
#include <cstdint>
#include <vector>

#include "chunkvale/backend.h"
#include "chunkvale/cache_stats.h"
#include "selection_rule.h"
#include "step.h"

namespace chunkvale {

class ChunkSelector {
 public:
  // `digests`: the backend's (null without eviction: then nothing is asked of it); chunks
  // of `chunk_size` tokens. KVCache and PagedAttention (blocks for chunks) both select here.
  ChunkSelector(const EvictionConfig& eviction, int chunk_size, Digests* digests, const PlanParams& params);

  // This layer's plan over the kept chunks, or null when nothing is dropped (the step's
  // plan stands). Valid until the next call. `decodes[i]`: plan.seqs[i] is a decode row
  // (SelectionRule::decodes).
  const StepPlan* select(int layer, const StepPlan& plan, const uint8_t* decodes, const TensorView& q,
                         const ExecContext& ctx);
  const StepPlan* select(int layer, const PlannedStep& step, const TensorView& q, const ExecContext& ctx);
  // The chunks (ids) of prefill / extend rows, over budget from their next decode step on,
  // that their last prompt token would not select.
  const std::vector<int32_t>& unselected_after_prefill(int layer, const PlannedStep& step, const TensorView& q,
                                                      const ExecContext& ctx);

  const CacheStats& counts() const { return counts_; }  // part_counts.h

 private:
  void top_requests(int layer, const TensorView& q, const ExecContext& ctx);  // score_reqs_ -> top_

  Digests* digests_;
  const PlanParams& params_;
  SelectionRule rule_;
  StepPlan layer_plan_;
  std::vector<std::vector<uint8_t>> keep_;
  std::vector<PlanSeqInput> inputs_;
  std::vector<int32_t> top_;  // k per request
  std::vector<uint8_t> taken_, decodes_;
  std::vector<Digests::ScoreRequest> score_reqs_;
  std::vector<int32_t> cand_lo_, unselected_;
  CacheStats counts_;  // chunks scored and dropped, time selecting and scoring
};

}  // namespace chunkvale
