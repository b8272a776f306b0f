// Scores of budgeted attention's candidates for per-KV-head selection: for each KV head g
// and candidate chunk, the largest digest bound of q_h.k over g's query heads h (each
// bound as docs/API.md defines it per digest kind). Unlike shared selection's sum, a
// largest bound cannot pool a group's queries first, so each query head is scored. One
// definition for every host scorer (CpuBackend's pool and a caller's paged pool).
#pragma once
#include <cstddef>

#include "kernels.h"

namespace chunkvale {

// `q`: the row's query heads in float32, [kv_heads * group][D]. Writes the score of
// candidate c (a.slots[c], c < a.n) for KV head g to scores[g * head_stride + c].
void score_chunks_per_head(const ScoreArgs& a, const float* q, float* scores, size_t head_stride);

}  // namespace chunkvale
