// The explicit step (chunkvale::Step): plan() returns it with its rows; commit() is the one
// call that caches its tokens (reads never do); commit() and cancel() are idempotent; a
// committed step is not cancelled and says so through committed(); a stale step is refused
// by name; a cache's next call that starts new work commits a complete step nobody committed.
#include <vector>

#include "check.h"
#include "chunkvale/kv_cache.h"

using namespace chunkvale;

namespace {
constexpr int C = 16, L = 2, D = 64;

CacheConfig config() {
  CacheConfig c;
  c.layers = L, c.q_heads = 2, c.kv_heads = 1, c.head_dim = D, c.chunk_size = C, c.capacity_chunks = 16;
  c.threads = 1;
  return c;
}

std::vector<int32_t> tokens(int n, int32_t first) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) t[size_t(i)] = first + i;
  return t;
}

void append_layers(KVCache& cache, const Step& step, int layers) {
  std::vector<float> kv(size_t(step.num_tokens()) * D, 0.25f);
  const TensorView t = tensor_view(kv.data(), DType::Float32, step.num_tokens(), 1, D);
  for (int l = 0; l < layers; ++l) cache.append(l, step, t, t);
}

bool same(const CacheStats& a, const CacheStats& b) {
  return a.chunks_in_use == b.chunks_in_use && a.chunks_cached == b.chunks_cached && a.sequences == b.sequences &&
         a.tokens_cached == b.tokens_cached && a.chunks_shared == b.chunks_shared;
}

void plan_returns_the_rows() {
  KVCache cache(config());
  const int64_t a = cache.add_sequence(tokens(20, 1)).first, b = cache.add_sequence(tokens(5, 100)).first;
  Step step = cache.plan({PlanEntry{a, 20, {}}, PlanEntry{b, 3, {}}});
  CHECK(step.id() != 0 && step.num_tokens() == 23);
  CHECK(step.seq_ids() == std::vector<int64_t>({a, b}));
  CHECK(step.row_offsets() == std::vector<int32_t>({0, 20, 23}));
  CHECK(step.positions().size() == 23 && step.positions()[19] == 19 && step.positions()[20] == 0);
  CHECK(!step.committed() && !step.cancelled());
  Step copy = step;  // a handle: copies share the state
  append_layers(cache, step, L);
  copy.commit();
  CHECK(step.committed() && copy.committed());
}

void reads_never_commit() {
  KVCache cache(config());
  const int64_t a = cache.add_sequence(tokens(40, 1)).first, b = cache.add_sequence(tokens(5, 100)).first;
  Step step = cache.plan({PlanEntry{a, 40, {}}});
  append_layers(cache, step, L);
  const CacheStats before = cache.stats();
  CHECK(cache.sequence_length(a) == 0 && cache.stats().tokens_cached == 0 && cache.stats().chunks_shared == 0);
  CHECK(cache.sequence_slots(a).size() == 3);
  CHECK(same(before, cache.stats()) && !step.committed());
  // needs() is a read too: it does not guess what the commit would change.
  CHECK_THROWS(cache.needs({PlanEntry{b, 5, {}}}), ValueError, "not committed");
  CHECK(!step.committed());
  step.commit();
  CHECK(step.committed() && cache.sequence_length(a) == 40 && cache.stats().tokens_cached == 40);
  CHECK(cache.needs({PlanEntry{a, 0, {7}}}).fits());
}

void commit_is_idempotent_and_checked() {
  KVCache cache(config());
  const int64_t a = cache.add_sequence(tokens(10, 1)).first;
  Step step = cache.plan({PlanEntry{a, 10, {}}});
  append_layers(cache, step, 1);
  const CacheStats before = cache.stats();
  CHECK_THROWS(step.commit(), ValueError, "appended in 1 of 2 layers");
  CHECK_THROWS(cache.commit(step), ValueError, "step:");
  CHECK(!step.committed() && same(before, cache.stats()));
  std::vector<float> kv(size_t(10) * D, 0.5f);
  const TensorView t = tensor_view(kv.data(), DType::Float32, 10, 1, D);
  cache.append(1, step, t, t);
  step.commit();
  const CacheStats once = cache.stats();
  step.commit();
  cache.commit(step);
  CHECK(step.committed() && same(once, cache.stats()) && cache.sequence_length(a) == 10);
  // Attention still runs on a committed step until the step ends.
  std::vector<float> q(size_t(10) * 2 * D, 0.1f), out(q.size());
  cache.attention(0, step, tensor_view(q.data(), DType::Float32, 10, 2, D),
                  tensor_view(out.data(), DType::Float32, 10, 2, D));
}

void a_committed_step_is_not_cancelled_and_says_so() {
  KVCache cache(config());
  const int64_t a = cache.add_sequence(tokens(10, 1)).first;
  Step step = cache.plan({PlanEntry{a, 10, {}}});
  append_layers(cache, step, L);
  step.commit();
  const CacheStats before = cache.stats();
  CHECK(!step.cancel());  // no exception: committed() is the answer
  CHECK(step.committed() && !step.cancelled() && same(before, cache.stats()));
  CHECK_THROWS(cache.cancel(step), ValueError, "is committed");  // the strict form refuses by name
  CHECK(cache.sequence_length(a) == 10);
}

void cancel_is_idempotent() {
  KVCache cache(config());
  const int64_t a = cache.add_sequence(tokens(30, 1)).first;
  const CacheStats empty = cache.stats();
  Step step = cache.plan({PlanEntry{a, 30, {}}});
  append_layers(cache, step, L);  // complete but not committed: still cancellable
  CHECK(step.cancel() && step.cancelled() && !step.committed());
  CHECK(same(empty, cache.stats()) && cache.sequence_length(a) == 0);
  CHECK(step.cancel() && same(empty, cache.stats()));  // again: nothing more happens
  CHECK_THROWS(step.commit(), ValueError, "was cancelled");
  CHECK_THROWS(cache.cancel(step), ValueError, "(cancelled)");
  // The prompt is still pending: plan it again.
  Step again = cache.plan({PlanEntry{a, 30, {}}});
  append_layers(cache, again, L);
  again.commit();
  CHECK(cache.sequence_length(a) == 30);
}

void a_stale_step_is_refused_by_name() {
  KVCache cache(config()), other(config());
  const int64_t a = cache.add_sequence(tokens(10, 1)).first;
  Step old = cache.plan({PlanEntry{a, 10, {}}});
  append_layers(cache, old, L);
  // Never committed by its caller: the next plan commits it (the compat rule), then ends it.
  Step next = cache.plan({PlanEntry{a, 0, {5}}});
  CHECK(old.committed() && cache.sequence_length(a) == 10);
  std::vector<float> kv(size_t(D), 0.5f);
  const TensorView t = tensor_view(kv.data(), DType::Float32, 1, 1, D);
  CHECK_THROWS(cache.append(0, old, t, t), ValueError, "step: expected the open step");
  CHECK_THROWS(cache.step_plan(old), ValueError, "(committed, then ended)");
  CHECK(!old.cancel() && old.committed());  // lenient: nothing to do
  old.commit();                             // idempotent, even once ended
  // Another cache's step, and an empty one, are refused by name too.
  const int64_t o = other.add_sequence(tokens(1, 1)).first;
  Step foreign = other.plan({PlanEntry{o, 1, {}}});
  CHECK_THROWS(cache.append(0, foreign, t, t), ValueError, "step: expected the open step");
  CHECK_THROWS(cache.cancel(foreign), ValueError, "step:");
  CHECK_THROWS(cache.commit(Step{}), ValueError, "step:");
  CHECK_THROWS(Step{}.commit(), ValueError, "step: expected a Step returned by plan()");
  CHECK(next.cancel());
}

void a_step_may_outlive_its_cache() {
  Step open;
  {
    KVCache cache(config());
    const int64_t a = cache.add_sequence(tokens(4, 1)).first;
    open = cache.plan({PlanEntry{a, 4, {}}});
  }
  CHECK(open.cancelled() && open.cancel());
  CHECK_THROWS(open.commit(), ValueError, "cancelled");
}

}  // namespace

int main() {
  plan_returns_the_rows();
  reads_never_commit();
  commit_is_idempotent_and_checked();
  a_committed_step_is_not_cancelled_and_says_so();
  cancel_is_idempotent();
  a_stale_step_is_refused_by_name();
  a_step_may_outlive_its_cache();
  return finish("step_lifecycle");
}
