// Chunk selection alone, over digests that rank candidates by a fixed rule: a decoding
// sequence over budget keeps sinks + window + its top-k; the rest attend to everything.
#include <algorithm>
#include <set>
#include <vector>

#include "check.h"
#include "chunk_selection.h"
#include "chunkvale/kv_cache.h"

using namespace chunkvale;

namespace {
constexpr int C = 16;

// Ranks the candidates of each request by chunk id, highest first; records what it was asked.
struct RankingDigests final : Digests {
  std::vector<std::vector<int32_t>> asked;  // candidate chunk ids per request
  std::vector<int32_t> rows;
  void update_digests(int, const int32_t*, const int32_t*, size_t, const ExecContext&) override {}
  void top_chunks(int, const TensorView&, const ScoreRequest* reqs, size_t count, int k,
                  const ExecContext&) override {
    for (size_t r = 0; r < count; ++r) {
      std::vector<int32_t> idx(reqs[r].n);
      for (size_t i = 0; i < idx.size(); ++i) idx[i] = int32_t(i);
      std::sort(idx.begin(), idx.end(), [&](int32_t x, int32_t y) { return reqs[r].slots[x] > reqs[r].slots[y]; });
      std::copy(idx.begin(), idx.begin() + k, reqs[r].top);
      asked.emplace_back(reqs[r].slots, reqs[r].slots + reqs[r].n);
      rows.push_back(reqs[r].row);
    }
  }
};

CacheConfig config() {
  CacheConfig c;
  c.layers = 2, c.q_heads = 2, c.kv_heads = 1, c.head_dim = 64, c.chunk_size = C, c.capacity_chunks = 64;
  c.threads = 1;
  c.eviction.enabled = true;
  c.eviction.budget_tokens = 4 * C;
  c.eviction.sink_chunks = 1, c.eviction.window_chunks = 1, c.eviction.topk_chunks = 2;
  return c;
}

struct Fixture {
  CacheConfig cfg = config();
  PrefixTree tree{C};
  SequenceTable seqs{tree, C};
  StepPlanner planner{cfg};
  RankingDigests backend;
  ChunkSelector selector{cfg.eviction, cfg.chunk_size, &backend, planner.params()};
  int32_t next = 0;
  std::function<int32_t()> take = [this] { return next++; };
  int64_t add_committed(int n) {  // n tokens already cached, in private chunks
    std::vector<int32_t> toks(static_cast<size_t>(n), int32_t(seqs.size()));
    const int64_t id = seqs.add(tree.root(std::to_string(seqs.size())), {}, [] { return -1; }, toks, n);
    for (int i = 0; i * C < n; ++i) seqs.get(id, "s").tail.push_back(next++);
    return id;
  }
};

std::set<int32_t> attended(const StepPlan& p) {
  std::set<int32_t> s;
  for (const UnitChunk& u : p.unit_chunks) s.insert(u.slot);
  return s;
}

void decode_over_budget_selects() {
  Fixture f;
  const int64_t a = f.add_committed(100);  // chunks 0..6
  const int64_t b = f.add_committed(20);   // chunks 7, 8: within budget
  auto st = f.planner.build({PlanEntry{a, 0, {1}}, PlanEntry{b, 0, {2}}}, f.seqs, f.tree, f.take);
  TensorView q{};
  const StepPlan* kept = f.selector.select(2, *st, q, ExecContext{});
  CHECK(kept != nullptr && kept->id == st->id && kept->revision != st->plan.revision);
  // a: sink 0, window 6, top-2 of candidates 1..5 by the fake's rule (5, 4); b: everything.
  CHECK(attended(*kept) == std::set<int32_t>({0, 4, 5, 6, 7, 8}));
  CHECK(f.backend.asked.size() == 1 && f.backend.asked[0] == std::vector<int32_t>({1, 2, 3, 4, 5}));
  CacheStats stats;
  stats = f.selector.counts();
  CHECK(stats.evict_scored_chunks == 5 && stats.evict_dropped_chunks == 3);
  // Nobody over budget decodes: nothing dropped, no scoring.
  st->commit(f.seqs);
  f.planner.recycle(*st);
  auto p = f.planner.build({PlanEntry{b, 0, {3, 4}}}, f.seqs, f.tree, f.take);
  CHECK(f.selector.select(2, *p, q, ExecContext{}) == nullptr && f.backend.asked.size() == 1);
}

void after_prefill_names_the_unselected() {
  Fixture f;
  std::vector<int32_t> toks(100, 3);
  const int64_t a = f.seqs.add(f.tree.root(""), {}, [] { return -1; }, toks, 0);
  auto st = f.planner.build({PlanEntry{a, 100, {}}}, f.seqs, f.tree, f.take);
  TensorView q{};
  CHECK(f.selector.select(2, *st, q, ExecContext{}) == nullptr);  // a prefill attends to everything
  // From its next decode step on it selects: candidates 1..5, the fake keeps 5 and 4.
  const std::vector<int32_t>& out = f.selector.unselected_after_prefill(2, *st, q, ExecContext{});
  CHECK(std::set<int32_t>(out.begin(), out.end()) == std::set<int32_t>({1, 2, 3}));
  CHECK(f.backend.rows.back() == 99);  // scored for its last prompt token
}
}  // namespace

int main() {
  decode_over_budget_selects();
  after_prefill_names_the_unselected();
  return finish("chunk_selection");
}
