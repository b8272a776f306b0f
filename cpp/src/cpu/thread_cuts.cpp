#include "thread_cuts.h"

#include <algorithm>

namespace chunkvale {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Splits n chunks into at most `pieces` contiguous segments of at least min_len.
void segment_bounds(size_t n, int64_t pieces, size_t min_len, std::vector<size_t>& b) {
  b.assign(1, 0);
  if (n == 0) return;
  size_t len = std::max<size_t>(min_len, size_t(ceil_div(int64_t(n), std::max<int64_t>(1, pieces))));
  for (size_t s = len; s < n; s += len) b.push_back(s);
  b.push_back(n);
}

}  // namespace

void cut_for_threads(const StepPlan& plan, int threads, int kv_heads, ThreadCuts& cuts) {
  cuts.plan_layout = plan.layout;
  cuts.pieces.clear();
  cuts.partial_rows = 0;
  // Chunk-first runs: enough pieces that every thread has work, in proportion to the run's
  // share of all run chunks (items are pieces x KV heads).
  int64_t run_chunks = 0;
  for (const WorkUnit& u : plan.units)
    if (u.chunk_first) run_chunks += u.chunk_end - u.chunk_begin;
  // Sequence-first row blocks: split (flash-decoding style) when there are too few items.
  int64_t seq_items = 0;
  for (const StepSeq& s : plan.seqs) seq_items += ceil_div(s.n_new, kSeqRowBlock);
  const int64_t want = int64_t(4) * threads;
  const int64_t seq_pieces = seq_items == 0 || seq_items * kv_heads >= want ? 1 : ceil_div(want, seq_items * kv_heads);

  std::vector<size_t> b;
  for (const WorkUnit& u : plan.units) {
    const size_t n = size_t(u.chunk_end - u.chunk_begin);
    if (u.chunk_first)
      segment_bounds(n, ceil_div(int64_t(2) * threads * int64_t(n), std::max<int64_t>(1, run_chunks) * kv_heads), 4, b);
    else
      segment_bounds(n, seq_pieces, 8, b);
    for (size_t j = 0; j + 1 < b.size(); ++j) {
      UnitPiece p;
      p.chunk_begin = u.chunk_begin + int32_t(b[j]);
      p.chunk_end = u.chunk_begin + int32_t(b[j + 1]);
      p.row_begin = u.row_begin;
      p.row_end = u.row_end;
      p.partial_begin = cuts.partial_rows;
      p.causal = u.causal;
      cuts.partial_rows += u.row_end - u.row_begin;
      cuts.pieces.push_back(p);
    }
  }

  // Merge lists, CSR by packed row (a counting sort keeps partials in piece order).
  std::vector<int32_t>& off = cuts.row_partial_offsets;
  off.assign(size_t(plan.num_tokens) + 1, 0);
  for (const UnitPiece& p : cuts.pieces)
    for (int32_t r = p.row_begin; r < p.row_end; ++r) ++off[size_t(plan.unit_rows[size_t(r)]) + 1];
  for (int32_t r = 0; r < plan.num_tokens; ++r) off[size_t(r) + 1] += off[size_t(r)];
  cuts.row_partials.assign(size_t(off.back()), 0);
  std::vector<int32_t> fill(off.begin(), off.end() - 1);
  for (const UnitPiece& p : cuts.pieces)
    for (int32_t r = p.row_begin; r < p.row_end; ++r)
      cuts.row_partials[size_t(fill[size_t(plan.unit_rows[size_t(r)])]++)] = p.partial_begin + (r - p.row_begin);
}

}  // namespace chunkvale
