// plan_paged: one step's plan over a caller's page tables. It depends only on the block size
// and the share threshold, so planning needs no PagedAttention (no threads, no scale): a
// serving stack's metadata builder plans once per step and every layer's runner runs it.
#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

#include "chunk_selection.h"
#include "chunkvale/errors.h"
#include "chunkvale/paged_attention.h"
#include "plan_builder.h"

namespace chunkvale {
namespace {

[[noreturn]] void fail(const std::string& msg) { throw ValueError(msg); }
std::string num(int64_t v) { return std::to_string(v); }

}  // namespace

std::shared_ptr<const PagedPlan> plan_paged(const PagedBatch& b, int block_size, int share_threshold) {
  if (!(block_size >= 16 && block_size <= 512 && block_size % 16 == 0)) fail("block_size: expected a multiple of 16 in [16, 512], got " + num(block_size));
  if (!(share_threshold >= 1)) fail("share_threshold: expected an integer >= 1, got " + num(share_threshold));
  const int64_t B = block_size;
  const int32_t n = b.num_seqs;
  if (!(n >= 0)) fail("seq_lens: expected num_seqs >= 0, got " + num(n));
  if (!(b.num_blocks >= 0 && b.num_blocks < (int64_t(1) << 31))) fail("num_blocks: expected an integer in [0, 2^31), got " + num(b.num_blocks));
  if (!(b.table_width >= 0 && b.row_stride >= b.table_width)) fail("block_table: expected a row stride >= its " + num(b.table_width) + " columns, got " + num(b.row_stride));
  if (!(n == 0 || (b.seq_lens && b.query_start_loc && (b.block_table || b.table_width == 0)))) fail("block_table: expected data, got a null pointer");
  if (!(n == 0 || b.query_start_loc[0] == 0)) fail("query_start_loc: expected 0 first, got " + num(n ? b.query_start_loc[0] : 0));

  // The whole batch is checked before anything is built.
  std::vector<std::tuple<int32_t, int32_t, int32_t>> uses;  // (block, sequence, entry)
  for (int32_t i = 0; i < n; ++i) {
    const int64_t rows = int64_t(b.query_start_loc[i + 1]) - b.query_start_loc[i];
    const int64_t len = b.seq_lens[i];
    if (!(rows >= 0)) fail("query_start_loc: expected non-decreasing offsets, got " + num(b.query_start_loc[i]) + " then " +
                        num(b.query_start_loc[i + 1]) + " at sequence " + num(i));
    if (!(len >= rows)) fail("seq_lens: expected at least the sequence's " + num(rows) + " new query rows at sequence " +
                          num(i) + ", got " + num(len));
    if (!(len <= b.table_width * B)) fail("seq_lens: expected at most table_width * block_size = " +
                                       num(b.table_width * B) + " tokens at sequence " + num(i) + ", got " + num(len));
    const int32_t* row = b.block_table + int64_t(i) * b.row_stride;
    for (int32_t k = 0; k < int32_t((len + B - 1) / B); ++k) {
      if (!(row[k] >= 0 && row[k] < b.num_blocks)) fail("block_table: expected block ids in [0, num_blocks=" + num(b.num_blocks) + ") for the blocks sequence " +
               num(i) + " uses, got " + num(row[k]) + " at entry " + num(k));
      uses.emplace_back(row[k], i, k);
    }
  }
  std::sort(uses.begin(), uses.end());
  for (size_t u = 1; u < uses.size(); ++u) {
    const auto [blk, s1, e1] = uses[u - 1];
    const auto [blk2, s2, e2] = uses[u];
    if (blk != blk2) continue;
    if (!(s1 != s2)) fail("block_table: expected distinct blocks within a sequence, got block " + num(blk) + " at entries " +
                       num(e1) + " and " + num(e2) + " of sequence " + num(s1));
    if (!(e1 == e2)) fail("block_table: expected a block that several sequences use at the same entry in each, got block " +
                       num(blk) + " at entry " + num(e1) + " of sequence " + num(s1) + " and entry " + num(e2) +
                       " of sequence " + num(s2));
  }

  // A block can run chunk-first for a sequence when it is full and wholly before the
  // sequence's first new row (no causal mask inside it); the planner shares those of them
  // that several sequences use.
  std::vector<PlanSeqInput> in(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; ++i) {
    const int64_t rows = int64_t(b.query_start_loc[i + 1]) - b.query_start_loc[i];
    PlanSeqInput& s = in[size_t(i)];
    s.id = i;
    s.n_new = int32_t(rows);
    s.ctx_before = b.seq_lens[i] - rows;
    s.slots = b.block_table + int64_t(i) * b.row_stride;
    s.n_chunks = int32_t((b.seq_lens[i] + B - 1) / B);
    s.n_shared = int32_t(s.ctx_before / B);
  }
  auto out = std::make_shared<PagedPlan>();
  out->block_size = block_size;
  out->num_blocks = b.num_blocks;
  plan_step(out->plan, in, PlanParams{block_size, share_threshold});
  out->decodes.resize(out->plan.seqs.size());
  for (size_t i = 0; i < out->decodes.size(); ++i)
    out->decodes[i] = SelectionRule::decodes(out->plan.seqs[i].n_new, false);
  return out;
}

}  // namespace chunkvale
