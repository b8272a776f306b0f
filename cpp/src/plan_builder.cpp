#include "plan_builder.h"

#include <algorithm>
#include <unordered_map>

namespace chunkvale {
namespace {

constexpr int kRowBlock = 32;  // token rows per sequence-first unit (causal prefill)

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Adds one work unit over chunks [chunks) and rows [rows) with fresh partial rows.
void add_unit(StepPlan& plan, const std::vector<UnitChunk>& chunks, size_t c0, size_t c1,
              const std::vector<int32_t>& rows, bool causal, bool chunk_first, int32_t seq,
              std::vector<std::pair<int32_t, int32_t>>& merges) {
  WorkUnit u;
  u.chunk_begin = int32_t(plan.unit_chunks.size());
  plan.unit_chunks.insert(plan.unit_chunks.end(), chunks.begin() + long(c0), chunks.begin() + long(c1));
  u.chunk_end = int32_t(plan.unit_chunks.size());
  u.row_begin = int32_t(plan.unit_rows.size());
  plan.unit_rows.insert(plan.unit_rows.end(), rows.begin(), rows.end());
  u.row_end = int32_t(plan.unit_rows.size());
  u.partial_begin = plan.partial_rows;
  for (size_t i = 0; i < rows.size(); ++i) merges.emplace_back(rows[i], plan.partial_rows + int32_t(i));
  plan.partial_rows += int32_t(rows.size());
  u.causal = causal;
  u.chunk_first = chunk_first;
  u.seq = seq;
  plan.units.push_back(u);
}

// Splits a chunk list into at most `pieces` contiguous segments of at least min_len.
std::vector<size_t> segment_bounds(size_t n, int64_t pieces, size_t min_len) {
  std::vector<size_t> b{0};
  if (n == 0) return b;
  size_t len = std::max<size_t>(min_len, size_t(ceil_div(int64_t(n), std::max<int64_t>(1, pieces))));
  for (size_t s = len; s < n; s += len) b.push_back(s);
  b.push_back(n);
  return b;
}

}  // namespace

void plan_step(StepPlan& plan, const std::vector<PlanSeqInput>& batch, const PlanParams& p) {
  const int C = p.chunk_size;
  plan.seqs.clear();
  plan.seq_chunks.clear();
  plan.positions.clear();
  plan.row_seq.clear();
  plan.units.clear();
  plan.unit_chunks.clear();
  plan.unit_rows.clear();
  plan.partial_rows = 0;
  plan.chunk_first_units = 0;
  plan.chunk_first_chunks = 0;

  // Sequences, packed rows, chunk lists.
  int32_t row = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    const PlanSeqInput& in = batch[i];
    StepSeq s;
    s.seq_id = in.id;
    s.row_begin = row;
    s.n_new = in.n_new;
    s.ctx_before = in.ctx_before;
    s.n_shared = in.n_shared;
    s.chunk_begin = int32_t(plan.seq_chunks.size());
    plan.seq_chunks.insert(plan.seq_chunks.end(), in.slots, in.slots + in.n_chunks);
    s.chunk_end = int32_t(plan.seq_chunks.size());
    for (int32_t t = 0; t < in.n_new; ++t) {
      plan.positions.push_back(in.ctx_before + t);
      plan.row_seq.push_back(int32_t(i));
    }
    row += in.n_new;
    plan.seqs.push_back(s);
  }
  plan.num_tokens = row;
  auto kept = [&](size_t i, int32_t k) { return !batch[i].keep || batch[i].keep[k]; };

  // Which batch sequences attend each shared chunk (a slot is one tree node), and how
  // many query rows that makes. Only chunks two or more sequences attend can run
  // chunk-first, so only those get a user list (a sort finds them; a decode batch without
  // common prefixes then builds no map at all).
  std::vector<std::pair<int32_t, int32_t>> attended;  // (slot, sequence)
  for (size_t i = 0; i < batch.size(); ++i)
    for (int32_t k = 0; k < batch[i].n_shared; ++k)
      if (kept(i, k)) attended.emplace_back(batch[i].slots[k], int32_t(i));
  std::sort(attended.begin(), attended.end());
  std::unordered_map<int32_t, std::vector<int32_t>> users;
  for (size_t a = 0; a < attended.size();) {
    size_t b = a + 1;
    while (b < attended.size() && attended[b].first == attended[a].first) ++b;
    if (b - a >= 2) {
      auto& us = users[attended[a].first];
      for (size_t j = a; j < b; ++j) us.push_back(attended[j].second);
    }
    a = b;
  }
  static const std::vector<int32_t> kNoUsers;
  auto users_of = [&](int32_t slot) -> const std::vector<int32_t>& {
    auto it = users.find(slot);
    return it == users.end() ? kNoUsers : it->second;
  };
  auto first_phase = [&](int32_t slot) {
    const auto& us = users_of(slot);
    if (us.size() < 2) return false;
    int64_t rows = 0;
    for (int32_t s : us) rows += batch[size_t(s)].n_new;
    return rows >= p.share_threshold;
  };

  std::vector<std::pair<int32_t, int32_t>> merges;  // (packed row, partial row)
  std::vector<std::vector<uint8_t>> covered(batch.size());
  for (size_t i = 0; i < batch.size(); ++i) covered[i].assign(size_t(batch[i].n_chunks), 0);

  // Chunk-first: runs of shared chunks, consecutive in a sequence's attended order, with
  // the same set of users. A chunk sits at the same index in every user's list.
  std::unordered_map<int32_t, bool> done;
  std::vector<UnitChunk> chunks;
  std::vector<int32_t> rows, run;
  std::vector<std::pair<size_t, std::vector<int32_t>>> runs;  // (a user, chunk indices)
  for (size_t i = 0; i < batch.size() && !users.empty(); ++i) {
    const int32_t* sl = batch[i].slots;
    for (int32_t k = 0; k < batch[i].n_shared; ++k) {
      if (!kept(i, k) || done.count(sl[k]) || !first_phase(sl[k])) continue;
      const auto& us = users_of(sl[k]);
      run.clear();
      for (int32_t e = k; e < batch[i].n_shared; ++e) {
        if (!kept(i, e)) continue;
        if (done.count(sl[e]) || users_of(sl[e]) != us) break;
        done[sl[e]] = true;
        run.push_back(e);
      }
      runs.emplace_back(i, run);
    }
  }
  int64_t run_chunks = 0;
  for (const auto& r : runs) run_chunks += int64_t(r.second.size());
  for (const auto& r : runs) {
    const int32_t* sl = batch[r.first].slots;
    const auto& us = users_of(sl[r.second.front()]);
    rows.clear();
    for (int32_t s : us) {
      for (int32_t t = 0; t < batch[size_t(s)].n_new; ++t) rows.push_back(plan.seqs[size_t(s)].row_begin + t);
      for (int32_t k : r.second) covered[size_t(s)][size_t(k)] = 1;
    }
    chunks.clear();
    for (int32_t k : r.second) chunks.push_back({sl[k], C, int64_t(k) * C});
    // Enough pieces that every thread has work, in proportion to the run's share.
    int64_t pieces = ceil_div(int64_t(2) * p.threads * int64_t(chunks.size()),
                              std::max<int64_t>(1, run_chunks) * p.kv_heads);
    auto b = segment_bounds(chunks.size(), pieces, 4);
    for (size_t j = 0; j + 1 < b.size(); ++j) {
      add_unit(plan, chunks, b[j], b[j + 1], rows, false, true, -1, merges);
      ++plan.chunk_first_units;
    }
    plan.chunk_first_chunks += int32_t(chunks.size());
  }

  // Sequence-first: each sequence's remaining attended chunks, causal, in row blocks;
  // long lists are split (flash-decoding style) when there are too few items for the threads.
  int64_t seq_items = 0;
  for (const auto& in : batch) seq_items += ceil_div(in.n_new, kRowBlock);
  int64_t want = int64_t(4) * p.threads;
  int64_t pieces = seq_items * p.kv_heads >= want ? 1 : ceil_div(want, seq_items * p.kv_heads);
  for (size_t i = 0; i < batch.size(); ++i) {
    const StepSeq& s = plan.seqs[i];
    chunks.clear();
    const int64_t total = s.total();
    for (int32_t k = 0; k < batch[i].n_chunks; ++k) {
      if (covered[i][size_t(k)] || !kept(i, k)) continue;
      int64_t start = int64_t(k) * C;
      chunks.push_back({batch[i].slots[k], int32_t(std::min<int64_t>(C, total - start)), start});
    }
    for (int32_t t0 = 0; t0 < s.n_new; t0 += kRowBlock) {
      int32_t t1 = std::min(s.n_new, t0 + kRowBlock);
      rows.clear();
      for (int32_t t = t0; t < t1; ++t) rows.push_back(s.row_begin + t);
      int64_t last_pos = s.ctx_before + t1 - 1;
      size_t n = 0;
      while (n < chunks.size() && chunks[n].start <= last_pos) ++n;
      auto b = segment_bounds(n, pieces, 8);
      for (size_t j = 0; j + 1 < b.size(); ++j) add_unit(plan, chunks, b[j], b[j + 1], rows, true, false, int32_t(i), merges);
    }
  }

  // Merge lists, CSR by packed row (counting sort keeps partials in unit order).
  plan.row_partial_offsets.assign(size_t(plan.num_tokens) + 1, 0);
  for (const auto& m : merges) ++plan.row_partial_offsets[size_t(m.first) + 1];
  for (int32_t r = 0; r < plan.num_tokens; ++r) plan.row_partial_offsets[size_t(r) + 1] += plan.row_partial_offsets[size_t(r)];
  plan.row_partials.assign(merges.size(), 0);
  std::vector<int32_t> fill(plan.row_partial_offsets.begin(), plan.row_partial_offsets.end() - 1);
  for (const auto& m : merges) plan.row_partials[size_t(fill[size_t(m.first)]++)] = m.second;
}

bool bump_plan(StepPlan& plan, const std::vector<PlanSeqInput>& batch, const PlanParams& p) {
  if (plan.seqs.size() != batch.size() || plan.units.empty()) return false;
  for (size_t i = 0; i < batch.size(); ++i) {
    const StepSeq& s = plan.seqs[i];
    const PlanSeqInput& in = batch[i];
    if (s.seq_id != in.id || s.n_new != 1 || in.n_new != 1 || in.ctx_before != s.total() ||
        in.n_chunks != s.chunk_end - s.chunk_begin || in.keep)
      return false;
  }
  for (size_t i = 0; i < batch.size(); ++i) {
    StepSeq& s = plan.seqs[i];
    s.ctx_before += 1;
    plan.positions[size_t(s.row_begin)] = s.ctx_before;
  }
  for (const WorkUnit& u : plan.units) {
    if (u.chunk_first) continue;
    const int64_t total = plan.seqs[size_t(u.seq)].total();
    for (int32_t c = u.chunk_begin; c < u.chunk_end; ++c) {
      UnitChunk& ch = plan.unit_chunks[size_t(c)];
      ch.valid = int32_t(std::min<int64_t>(p.chunk_size, total - ch.start));
    }
  }
  return true;
}

}  // namespace chunkvale
