// The front's argument checks (ValueError / TypeError naming the argument, what was
// expected and what was given), kept apart so kv_cache.cpp reads as what each call does.
#pragma once
#include <cstdint>

#include "chunkvale/config.h"
#include "chunkvale/tensor.h"

namespace chunkvale {

// Throws ValueError naming `arg` unless 0 <= v < n (`what`: what the range is).
void check_index(const char* arg, int64_t v, int64_t n, const char* what);
// attention's tensors for a step of `rows` rows: q and out [rows, q_heads, head_dim]; lse
// (optional) float32 [rows, q_heads]; out and lse apart from q and from each other.
void check_attention_args(const CacheConfig& cfg, TensorView::Device device, int64_t rows, const TensorView& q,
                          const TensorView& out, const TensorView* lse);

}  // namespace chunkvale
