// The CPU backend's cut of a step plan for its threads: the core's units (whole shared
// chunk runs, whole sequence row blocks) split into pieces, contiguous chunk ranges of a
// unit for all its rows, so that every thread has work; flash-decoding style for long
// sequences when there are too few units. Each piece leaves its own softmax partials,
// numbered here, and each packed row gets the list of partials to merge.
#pragma once
#include <cstdint>
#include <vector>

#include "chunkvale/step_plan.h"

namespace chunkvale {

// One piece: chunks [chunk_begin, chunk_end) of the plan's unit_chunks (inside one unit's
// range) against that unit's rows [row_begin, row_end) of unit_rows.
struct UnitPiece {
  int32_t chunk_begin = 0, chunk_end = 0;
  int32_t row_begin = 0, row_end = 0;
  int32_t partial_begin = 0;  // first partial token-row (x group, per KV head)
  bool causal = false;
};

struct ThreadCuts {
  uint64_t plan_layout = 0;  // the plan layout (StepPlan::layout) these cuts are of (0: none yet)
  std::vector<UnitPiece> pieces;
  int32_t partial_rows = 0;  // token rows of partials per KV head (times group)
  // For each packed row, the partial token-rows to merge (CSR), in piece order.
  std::vector<int32_t> row_partial_offsets;  // num_tokens + 1
  std::vector<int32_t> row_partials;
};

// Cuts `plan` for `threads` threads, each piece running once per KV head.
void cut_for_threads(const StepPlan& plan, int threads, int kv_heads, ThreadCuts& cuts);

}  // namespace chunkvale
