// The step alone: the planner grows tails and builds (or reuses) the plan; a step commits
// its tokens into the sequences or, cancelled, gives back the chunks it added.
#include <vector>

#include "check.h"
#include "chunkvale/kv_cache.h"
#include "step.h"

using namespace chunkvale;

namespace {
constexpr int C = 16;

CacheConfig config(bool eviction = false) {
  CacheConfig c;
  c.layers = 2, c.q_heads = 2, c.kv_heads = 1, c.head_dim = 64, c.chunk_size = C, c.capacity_chunks = 64;
  c.threads = 1;
  if (eviction) {
    c.eviction.enabled = true;
    c.eviction.budget_tokens = 4 * C;
  }
  return c;
}

struct Fixture {
  PrefixTree tree{C};
  SequenceTable seqs{tree, C};
  int32_t next = 0;
  std::function<int32_t()> take = [this] { return next++; };
  int64_t add(int n) {
    std::vector<int32_t> toks(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) toks[size_t(i)] = 100 * int32_t(seqs.size()) + i;
    return seqs.add(tree.root(""), {}, [] { return -1; }, toks, 0);
  }
};

void build_commit_and_reuse() {
  Fixture f;
  StepPlanner planner(config());
  const int64_t a = f.add(20), b = f.add(5);
  auto st = planner.build({PlanEntry{a, 20, {}}, PlanEntry{b, 5, {}}}, f.seqs, f.tree, f.take);
  CHECK(st->entries.size() == 2 && st->entries[0].reserved == 2 && st->entries[1].reserved == 1 && f.next == 3);
  CHECK(st->plan.num_tokens == 25 && st->plan.id == st->id && st->appended.size() == 2);
  CHECK(st->entries[0].from_prompt && !st->decodes(0));
  CHECK(st->filled.empty());  // digests only with eviction
  st->commit(f.seqs);
  const Sequence& sa = f.seqs.get(a, "seq");
  CHECK(st->committed && sa.length() == 20 && sa.pending_count() == 0 && sa.path.size() == 1 && sa.tail.size() == 1);
  CHECK(f.tree.nodes() == 1);  // a's full chunk sealed
  planner.recycle(*st);
  // Decoding the same batch again only moves lengths: the plan is reused (after the first
  // decode step, rebuilt since the prefill sealed a chunk into the tree).
  CacheStats stats;
  for (int i = 0; i < 3; ++i) {
    auto d = planner.build({PlanEntry{a, 0, {7}}, PlanEntry{b, 0, {8}}}, f.seqs, f.tree, f.take);
    CHECK(d->decodes(0) && d->decodes(1) && d->plan.num_tokens == 2 && d->plan.id == d->id);
    d->commit(f.seqs);
    planner.recycle(*d);
  }
  stats = planner.counts();
  CHECK(stats.plan_rebuilds == 2 && stats.plan_reuses == 2);
  CHECK(f.seqs.get(a, "seq").length() == 23 && f.seqs.get(b, "seq").length() == 8);
}

void cancel_gives_back_what_it_added() {
  Fixture f;
  StepPlanner planner(config(true));
  const int64_t a = f.add(40);
  auto st = planner.build({PlanEntry{a, 40, {}}}, f.seqs, f.tree, f.take);
  CHECK(st->filled == std::vector<int32_t>({0, 1}));  // the full chunks it fills
  std::vector<int32_t> freed;
  st->cancel(f.seqs, freed);
  const Sequence& s = f.seqs.get(a, "seq");
  CHECK(freed == std::vector<int32_t>({2, 1, 0}) && s.tail.empty() && s.length() == 0 && s.pending_count() == 40);
  // An extend (explicit tokens, more than one) does not decode; one explicit token does.
  planner.recycle(*st);
  auto p = planner.build({PlanEntry{a, 40, {}}}, f.seqs, f.tree, f.take);
  p->commit(f.seqs);
  planner.recycle(*p);
  auto e = planner.build({PlanEntry{a, 0, {1, 2, 3}}}, f.seqs, f.tree, f.take);
  CHECK(!e->decodes(0));
}
}  // namespace

int main() {
  build_commit_and_reuse();
  cancel_gives_back_what_it_added();
  return finish("step");
}
