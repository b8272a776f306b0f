// Chunk selection alone, over digests that rank candidates by a fixed rule: a decoding
// sequence over budget keeps sinks + window + its top-k (with per-KV-head selection, each
// KV head its own); the rest attend to everything.
#include <algorithm>
#include <set>
#include <vector>

#include "check.h"
#include "chunk_selection.h"
#include "chunkvale/kv_cache.h"

using namespace chunkvale;

namespace {
constexpr int C = 16;

// Ranks the candidates of each request by chunk id, highest first (with `units` lists, unit
// u ranks every (u + 1)-th id first: heads that disagree); records what it was asked.
struct RankingDigests final : Digests {
  int units = 1;
  std::vector<std::vector<int32_t>> asked;  // candidate chunk ids per request
  std::vector<int32_t> rows;
  void update_digests(int, const int32_t*, const int32_t*, size_t, const ExecContext&) override {}
  void top_chunks(int, const TensorView&, const ScoreRequest* reqs, size_t count, int k,
                  const ExecContext&) override {
    for (size_t r = 0; r < count; ++r) {
      for (int u = 0; u < units; ++u) {
        std::vector<int32_t> idx(reqs[r].n);
        for (size_t i = 0; i < idx.size(); ++i) idx[i] = int32_t(i);
        auto key = [&](int32_t x) { return std::make_pair(reqs[r].slots[x] % (u + 1) == 0, reqs[r].slots[x]); };
        std::sort(idx.begin(), idx.end(), [&](int32_t x, int32_t y) { return key(x) > key(y); });
        std::copy(idx.begin(), idx.begin() + k, reqs[r].top + size_t(u) * size_t(k));
      }
      asked.emplace_back(reqs[r].slots, reqs[r].slots + reqs[r].n);
      rows.push_back(reqs[r].row);
    }
  }
};

CacheConfig config(int kv_heads = 1) {
  CacheConfig c;
  c.layers = 2, c.q_heads = 2 * kv_heads, c.kv_heads = kv_heads, c.head_dim = 64, c.chunk_size = C, c.capacity_chunks = 64;
  c.threads = 1;
  c.eviction.enabled = true;
  c.eviction.budget_tokens = 4 * C;
  c.eviction.sink_chunks = 1, c.eviction.window_chunks = 1, c.eviction.topk_chunks = 2;
  return c;
}

struct Fixture {
  explicit Fixture(int kv_heads = 1) : cfg(config(kv_heads)) { backend.units = selector.units(); }
  CacheConfig cfg;
  PrefixTree tree{C};
  SequenceTable seqs{tree, C};
  StepPlanner planner{cfg};
  RankingDigests backend;
  ChunkSelector selector{cfg.eviction, cfg.chunk_size, cfg.kv_heads, planner.params()};
  TensorView q{};
  ExecContext ctx;
  BackendScorer scorer{backend, 2, q, ctx};  // layer 2's scorer (the product binds one per call)
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
  const LayerPlans sel = f.selector.select(*st, f.scorer);
  const StepPlan* kept = sel.plans;
  CHECK(kept != nullptr && !sel.per_head && kept->id == st->id && kept->revision != st->plan.revision);
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
  CHECK(f.selector.select(*p, f.scorer).plans == nullptr && f.backend.asked.size() == 1);
}

void after_prefill_names_the_unselected() {
  Fixture f;
  std::vector<int32_t> toks(100, 3);
  const int64_t a = f.seqs.add(f.tree.root(""), {}, [] { return -1; }, toks, 0);
  auto st = f.planner.build({PlanEntry{a, 100, {}}}, f.seqs, f.tree, f.take);
  CHECK(f.selector.select(*st, f.scorer).plans == nullptr);  // a prefill attends to everything
  // From its next decode step on it selects: candidates 1..5, the fake keeps 5 and 4.
  const std::vector<int32_t>& out = f.selector.unselected_after_prefill(*st, f.scorer);
  CHECK(std::set<int32_t>(out.begin(), out.end()) == std::set<int32_t>({1, 2, 3}));
  CHECK(f.backend.rows.back() == 99);  // scored for its last prompt token
}

// Per-KV-head selection (the default without a host tier): one plan per KV head, each over
// that head's own top-k; sinks, window and rows within budget the same in every plan.
void per_kv_head_plans_keep_each_heads_own_top_k() {
  Fixture f(2);
  CHECK(f.cfg.eviction.per_kv_head() && f.selector.units() == 2);
  const int64_t a = f.add_committed(100);  // chunks 0..6
  const int64_t b = f.add_committed(20);   // chunks 7, 8: within budget
  auto st = f.planner.build({PlanEntry{a, 0, {1}}, PlanEntry{b, 0, {2}}}, f.seqs, f.tree, f.take);
  const LayerPlans sel = f.selector.select(*st, f.scorer);
  CHECK(sel.plans != nullptr && sel.per_head);
  // Candidates 1..5: head 0 ranks by id (5, 4), head 1 even ids first (4, 2).
  CHECK(attended(sel.plans[0]) == std::set<int32_t>({0, 4, 5, 6, 7, 8}));
  CHECK(attended(sel.plans[1]) == std::set<int32_t>({0, 2, 4, 6, 7, 8}));
  CHECK(sel.plans[0].num_tokens == st->plan.num_tokens && sel.plans[1].num_tokens == st->plan.num_tokens);
  CHECK(sel.plans[0].revision != sel.plans[1].revision);
  // Dropped: the candidates no head attends (1, 3).
  CHECK(f.selector.counts().evict_scored_chunks == 5 && f.selector.counts().evict_dropped_chunks == 2);
  // After a prefill the host tier is told what no head would keep.
  Fixture g(2);
  std::vector<int32_t> toks(100, 3);
  const int64_t c = g.seqs.add(g.tree.root(""), {}, [] { return -1; }, toks, 0);
  auto pre = g.planner.build({PlanEntry{c, 100, {}}}, g.seqs, g.tree, g.take);
  const std::vector<int32_t>& out = g.selector.unselected_after_prefill(*pre, g.scorer);
  CHECK(std::set<int32_t>(out.begin(), out.end()) == std::set<int32_t>({1, 3}));
}

// Shared selection asked for, or no top-k (sinks + window): one plan for every head.
void one_plan_when_shared_or_without_top_k() {
  for (int variant = 0; variant < 2; ++variant) {
    CacheConfig cfg = config(2);
    if (variant == 0) cfg.eviction.selection = Selection::Shared;
    else cfg.eviction.topk_chunks = 0, cfg.eviction.window_chunks = 2;
    StepPlanner planner{cfg};
    ChunkSelector selector{cfg.eviction, cfg.chunk_size, cfg.kv_heads, planner.params()};
    CHECK(selector.units() == 1);
  }
}
}  // namespace

int main() {
  decode_over_budget_selects();
  after_prefill_names_the_unselected();
  per_kv_head_plans_keep_each_heads_own_top_k();
  one_plan_when_shared_or_without_top_k();
  return finish("chunk_selection");
}
