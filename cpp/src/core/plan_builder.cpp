#include "plan_builder.h"

#include <algorithm>
#include <atomic>
#include <unordered_map>

namespace chunkvale {
namespace {

std::atomic<uint64_t> g_next_layout{1};

// Adds one work unit over chunks [c0, c1) and the given rows.
void add_unit(StepPlan& plan, const std::vector<UnitChunk>& chunks, size_t c0, size_t c1,
              const std::vector<int32_t>& rows, bool causal, bool chunk_first, int32_t seq) {
  WorkUnit u;
  u.chunk_begin = int32_t(plan.unit_chunks.size());
  plan.unit_chunks.insert(plan.unit_chunks.end(), chunks.begin() + long(c0), chunks.begin() + long(c1));
  u.chunk_end = int32_t(plan.unit_chunks.size());
  u.row_begin = int32_t(plan.unit_rows.size());
  plan.unit_rows.insert(plan.unit_rows.end(), rows.begin(), rows.end());
  u.row_end = int32_t(plan.unit_rows.size());
  u.causal = causal;
  u.chunk_first = chunk_first;
  u.seq = seq;
  plan.units.push_back(u);
}

}  // namespace

void plan_step(StepPlan& plan, const std::vector<PlanSeqInput>& batch, const PlanParams& p) {
  const int C = p.chunk_size;
  plan.layout = g_next_layout++;
  plan.seqs.clear();
  plan.seq_chunks.clear();
  plan.positions.clear();
  plan.row_seq.clear();
  plan.units.clear();
  plan.unit_chunks.clear();
  plan.unit_rows.clear();
  plan.chunk_first_units = 0;
  plan.chunk_first_chunks = 0;
  plan.chunk_first_seq_chunks = 0;
  plan.chunk_first_row_chunks = 0;

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
    add_unit(plan, chunks, 0, chunks.size(), rows, false, true, -1);
    ++plan.chunk_first_units;
    plan.chunk_first_chunks += int32_t(chunks.size());
    plan.chunk_first_seq_chunks += int64_t(chunks.size()) * int64_t(us.size());
    plan.chunk_first_row_chunks += int64_t(chunks.size()) * int64_t(rows.size());
  }

  // Sequence-first: each sequence's remaining attended chunks, causal, in row blocks (a
  // block sees the chunks up to its last row's position).
  for (size_t i = 0; i < batch.size(); ++i) {
    const StepSeq& s = plan.seqs[i];
    chunks.clear();
    const int64_t total = s.total();
    for (int32_t k = 0; k < batch[i].n_chunks; ++k) {
      if (covered[i][size_t(k)] || !kept(i, k)) continue;
      int64_t start = int64_t(k) * C;
      chunks.push_back({batch[i].slots[k], int32_t(std::min<int64_t>(C, total - start)), start});
    }
    for (int32_t t0 = 0; t0 < s.n_new; t0 += kSeqRowBlock) {
      int32_t t1 = std::min(s.n_new, t0 + kSeqRowBlock);
      rows.clear();
      for (int32_t t = t0; t < t1; ++t) rows.push_back(s.row_begin + t);
      int64_t last_pos = s.ctx_before + t1 - 1;
      size_t n = 0;
      while (n < chunks.size() && chunks[n].start <= last_pos) ++n;
      if (n > 0) add_unit(plan, chunks, 0, n, rows, true, false, int32_t(i));
    }
  }
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
