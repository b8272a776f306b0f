// The CPU backend's cut of a device-neutral step plan (cpp/src/cpu/thread_cuts.h): every unit's
// chunks are covered once, in order, by pieces of the sizes the thread count asks for; the
// pieces' partials are numbered densely and each packed row merges exactly the partials of
// the pieces that hold it.
#include <cstdio>
#include <vector>

#include "check.h"
#include "plan_builder.h"
#include "thread_cuts.h"

using namespace chunkvale;

namespace {

constexpr int C = 16;

struct Seq {
  std::vector<int32_t> slots;
  int32_t n_shared = 0, n_new = 1;
  int64_t ctx_before = 0;
};

StepPlan plan_of(const std::vector<Seq>& seqs, int share_threshold = 2) {
  std::vector<PlanSeqInput> batch;
  for (size_t i = 0; i < seqs.size(); ++i) {
    PlanSeqInput in;
    in.id = int64_t(i);
    in.n_new = seqs[i].n_new;
    in.ctx_before = seqs[i].ctx_before;
    in.slots = seqs[i].slots.data();
    in.n_chunks = int32_t(seqs[i].slots.size());
    in.n_shared = seqs[i].n_shared;
    batch.push_back(in);
  }
  PlanParams p;
  p.chunk_size = C;
  p.share_threshold = share_threshold;
  StepPlan plan;
  plan.revision = 1;
  plan_step(plan, batch, p);
  return plan;
}

// A decode sequence of n private chunks (slots from `first`), its last chunk partly full.
Seq decode_seq(int32_t first, int n) {
  Seq s;
  for (int i = 0; i < n; ++i) s.slots.push_back(first + i);
  s.ctx_before = int64_t(n - 1) * C + 3;
  return s;
}

// The invariants every cut keeps; returns the pieces per unit.
std::vector<int> check_cover(const StepPlan& plan, const ThreadCuts& cuts) {
  std::vector<int> per_unit(plan.units.size(), 0);
  size_t pi = 0;
  int32_t next_partial = 0;
  for (size_t u = 0; u < plan.units.size(); ++u) {
    const WorkUnit& w = plan.units[u];
    int32_t at = w.chunk_begin;
    while (pi < cuts.pieces.size() && cuts.pieces[pi].row_begin == w.row_begin && at < w.chunk_end) {
      const UnitPiece& p = cuts.pieces[pi];
      EXPECT(p.chunk_begin == at && p.chunk_end > p.chunk_begin && p.chunk_end <= w.chunk_end,
             "unit %zu: piece %zu covers [%d, %d), expected to start at %d", u, pi, p.chunk_begin, p.chunk_end, at);
      EXPECT(p.row_end == w.row_end && p.causal == w.causal, "piece %zu: rows or causality differ from its unit", pi);
      EXPECT(p.partial_begin == next_partial, "piece %zu: partials start at %d, expected %d", pi, p.partial_begin,
             next_partial);
      next_partial += p.row_end - p.row_begin;
      at = p.chunk_end;
      ++per_unit[u];
      ++pi;
    }
    EXPECT(at == w.chunk_end, "unit %zu: chunks [%d, %d) not covered", u, at, w.chunk_end);
  }
  EXPECT(pi == cuts.pieces.size(), "%zu pieces beyond the units", cuts.pieces.size() - pi);
  EXPECT(cuts.partial_rows == next_partial, "partial_rows %d, pieces hold %d", cuts.partial_rows, next_partial);
  // Merge lists: row r lists exactly the partial rows of the pieces holding r, in piece order.
  CHECK(cuts.row_partial_offsets.size() == size_t(plan.num_tokens) + 1);
  std::vector<std::vector<int32_t>> want(size_t(plan.num_tokens));
  for (const UnitPiece& p : cuts.pieces)
    for (int32_t r = p.row_begin; r < p.row_end; ++r)
      want[size_t(plan.unit_rows[size_t(r)])].push_back(p.partial_begin + (r - p.row_begin));
  for (int32_t r = 0; r < plan.num_tokens; ++r) {
    std::vector<int32_t> got(cuts.row_partials.begin() + cuts.row_partial_offsets[size_t(r)],
                             cuts.row_partials.begin() + cuts.row_partial_offsets[size_t(r) + 1]);
    EXPECT(got == want[size_t(r)] && !got.empty(), "row %d: merge list of %zu partials, expected %zu", r, got.size(),
           want[size_t(r)].size());
  }
  return per_unit;
}

void few_decodes_split_flash_decoding_style() {
  const StepPlan plan = plan_of({decode_seq(0, 40), decode_seq(100, 40)});
  CHECK(plan.units.size() == 2);  // the core's plan: one unit per sequence, whatever the threads
  ThreadCuts cuts;
  // 8 threads: 2 items < 32 wanted, 16 pieces asked of 40 chunks, at least 8 chunks each.
  cut_for_threads(plan, 8, 1, cuts);
  auto per_unit = check_cover(plan, cuts);
  EXPECT(per_unit[0] == 5 && per_unit[1] == 5, "8 threads: %d and %d pieces, expected 5", per_unit[0], per_unit[1]);
  for (const UnitPiece& p : cuts.pieces) EXPECT(p.chunk_end - p.chunk_begin == 8, "piece of %d chunks", p.chunk_end - p.chunk_begin);
  // 1 thread: 2 pieces asked (4 items wanted), of 20 chunks.
  cut_for_threads(plan, 1, 1, cuts);
  per_unit = check_cover(plan, cuts);
  EXPECT(per_unit[0] == 2 && per_unit[1] == 2, "1 thread: %d and %d pieces, expected 2", per_unit[0], per_unit[1]);
  // 1 thread and 4 KV heads: the 8 items already suffice.
  cut_for_threads(plan, 1, 4, cuts);
  per_unit = check_cover(plan, cuts);
  EXPECT(per_unit[0] == 1 && per_unit[1] == 1, "1 thread, 4 heads: %d and %d pieces, expected 1", per_unit[0],
         per_unit[1]);
  CHECK(cuts.plan_layout == plan.layout && plan.layout != 0);
}

void many_decodes_stay_whole() {
  std::vector<Seq> seqs;
  for (int i = 0; i < 8; ++i) seqs.push_back(decode_seq(100 * i, 12));
  const StepPlan plan = plan_of(seqs);
  ThreadCuts cuts;
  cut_for_threads(plan, 2, 1, cuts);
  for (int n : check_cover(plan, cuts)) EXPECT(n == 1, "a unit cut in %d pieces with enough items", n);
}

void shared_runs_split_by_their_share() {
  // Three sequences on 10 shared chunks, each with a private last chunk: one chunk-first run.
  std::vector<Seq> seqs;
  for (int i = 0; i < 3; ++i) {
    Seq s;
    for (int k = 0; k < 10; ++k) s.slots.push_back(k);
    s.slots.push_back(50 + i);
    s.n_shared = 10;
    s.ctx_before = 10 * C + 2;
    seqs.push_back(s);
  }
  const StepPlan plan = plan_of(seqs);
  EXPECT(plan.chunk_first_units == 1 && plan.chunk_first_chunks == 10, "%d chunk-first units of %d chunks",
         plan.chunk_first_units, plan.chunk_first_chunks);
  ThreadCuts cuts;
  cut_for_threads(plan, 4, 1, cuts);  // 8 pieces asked of the run's 10 chunks, at least 4 each
  auto per_unit = check_cover(plan, cuts);
  EXPECT(per_unit[0] == 3, "chunk-first run in %d pieces, expected 3 (4 + 4 + 2)", per_unit[0]);
  // Every row merges the run's 3 partials and its own sequence-first one.
  for (int32_t r = 0; r < plan.num_tokens; ++r)
    EXPECT(cuts.row_partial_offsets[size_t(r) + 1] - cuts.row_partial_offsets[size_t(r)] >= 4,
           "row %d merges %d partials", r, cuts.row_partial_offsets[size_t(r) + 1] - cuts.row_partial_offsets[size_t(r)]);
  cut_for_threads(plan, 1, 1, cuts);  // 2 pieces asked: 5 + 5
  per_unit = check_cover(plan, cuts);
  EXPECT(per_unit[0] == 2, "1 thread: chunk-first run in %d pieces, expected 2", per_unit[0]);
}

void prefill_row_blocks() {
  // A 70-token prefill: row blocks of 32, 32 and 6 rows, each against its causal prefix.
  Seq s;
  for (int k = 0; k < 5; ++k) s.slots.push_back(k);
  s.n_new = 70;
  const StepPlan plan = plan_of({s});
  EXPECT(plan.units.size() == 3, "%zu units for a 70-row prefill", plan.units.size());
  ThreadCuts cuts;
  cut_for_threads(plan, 2, 1, cuts);
  check_cover(plan, cuts);
}

// A decode step that only bumps the plan keeps its layout, so the CPU backend keeps its cuts;
// they equal a fresh cut of the bumped plan. A rebuilt plan gets a new layout.
void bumped_plans_keep_their_layout() {
  std::vector<Seq> seqs;
  for (int i = 0; i < 3; ++i) seqs.push_back(decode_seq(100 * i, 12));
  StepPlan plan = plan_of(seqs);
  const uint64_t layout = plan.layout;
  ThreadCuts kept, fresh;
  cut_for_threads(plan, 2, 1, kept);
  std::vector<PlanSeqInput> batch;
  for (size_t i = 0; i < seqs.size(); ++i) {
    PlanSeqInput in;
    in.id = int64_t(i);
    in.n_new = 1;
    in.ctx_before = seqs[i].ctx_before + 1;
    in.slots = seqs[i].slots.data();
    in.n_chunks = int32_t(seqs[i].slots.size());
    batch.push_back(in);
  }
  PlanParams p;
  p.chunk_size = C;
  CHECK(bump_plan(plan, batch, p) && plan.layout == layout);
  cut_for_threads(plan, 2, 1, fresh);
  CHECK(fresh.partial_rows == kept.partial_rows && fresh.row_partials == kept.row_partials &&
        fresh.row_partial_offsets == kept.row_partial_offsets && fresh.pieces.size() == kept.pieces.size());
  for (size_t i = 0; i < fresh.pieces.size(); ++i)
    CHECK(fresh.pieces[i].chunk_begin == kept.pieces[i].chunk_begin &&
          fresh.pieces[i].chunk_end == kept.pieces[i].chunk_end &&
          fresh.pieces[i].partial_begin == kept.pieces[i].partial_begin);
  CHECK(plan_of(seqs).layout != layout);
}

}  // namespace

int main() {
  bumped_plans_keep_their_layout();
  few_decodes_split_flash_decoding_style();
  many_decodes_stay_whole();
  shared_runs_split_by_their_share();
  prefill_row_blocks();
  std::printf("%s: %d failures\n", failures() ? "FAIL" : "ok", failures());
  return failures() ? 1 : 0;
}
