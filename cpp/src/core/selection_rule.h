// The one rule of budgeted attention that admission, chunk selection and the host tier all
// follow: which sequence of a step selects chunks, and from which candidate range.
#pragma once
#include <algorithm>
#include <cstdint>

#include "chunkvale/config.h"

namespace chunkvale {

struct SelectionRule {
  int64_t sink = 0, window = 0, budget = 0;
  int topk = 0;

  SelectionRule(const EvictionConfig& ev, int chunk_size)
      : sink(ev.sink_chunks), window(ev.window_chunks), budget(ev.budget_tokens),
        topk(ev.resolved_topk(chunk_size)) {}

  // A decode row: one new token, given explicitly. Prompt tokens attend to everything,
  // even planned one at a time.
  static bool decodes(int64_t n_new, bool from_prompt) { return n_new == 1 && !from_prompt; }

  // Candidates [lo, hi) of a sequence of `chunks` chunks and `total` tokens: the chunks
  // outside (sinks, window) are always attended. `selects`: a decode row over budget
  // with more candidates than top-k.
  struct Range {
    int64_t lo = 0, hi = 0;
    bool selects = false;
  };
  Range of(bool decode, int64_t total, int64_t chunks) const {
    Range r;
    r.lo = std::min(sink, chunks);
    r.hi = std::max(r.lo, chunks - window);
    r.selects = decode && total > budget && r.hi - r.lo > topk;
    return r;
  }
};

}  // namespace chunkvale
