// plan_step: turns a batch (sequences, their chunks, new-token counts) into a StepPlan
// with two-phase work units. Pure host-side policy; no backend involved.
#pragma once
#include <cstdint>
#include <vector>

#include "chunkvale/step_plan.h"

namespace chunkvale {

// Builds the whole plan (work units, partial layout, merge lists).
void plan_step(StepPlan& plan, const std::vector<PlanSeqInput>& batch, const PlanParams& p);

// Lazy refresh: when the batch is the same sequences in the same order, each decoding
// one token, and no chunk was added or sealed, only lengths and positions move.
// Returns false (plan untouched) when a full rebuild is needed.
bool bump_plan(StepPlan& plan, const std::vector<PlanSeqInput>& batch, const PlanParams& p);

}  // namespace chunkvale
