// plan_step: turns a batch (sequences, their chunks, new-token counts) into a StepPlan
// with two-phase work units. Pure host-side policy; no backend involved.
#pragma once
#include <cstdint>
#include <vector>

#include "chunkvale/step_plan.h"

namespace chunkvale {

struct PlanSeqInput {
  int64_t id = 0;
  int32_t n_new = 0;
  int64_t ctx_before = 0;
  const int32_t* slots = nullptr;  // every chunk of the sequence, in token order
  int32_t n_chunks = 0;
  int32_t n_shared = 0;            // leading chunks that are tree nodes (shareable)
  const uint8_t* keep = nullptr;   // optional: attend only chunks with keep[i] != 0
};

struct PlanParams {
  int chunk_size = 32;
  int kv_heads = 1;
  int group = 1;
  int threads = 1;
  int share_threshold = 2;
};

// Builds the whole plan (work units, partial layout, merge lists).
void plan_step(StepPlan& plan, const std::vector<PlanSeqInput>& batch, const PlanParams& p);

// Lazy refresh: when the batch is the same sequences in the same order, each decoding
// one token, and no chunk was added or sealed, only lengths and positions move.
// Returns false (plan untouched) when a full rebuild is needed.
bool bump_plan(StepPlan& plan, const std::vector<PlanSeqInput>& batch, const PlanParams& p);

}  // namespace chunkvale
