// The C++ API's half of the contract (docs/API.md): bad arguments are chunkvale's
// ValueError / TypeError naming the argument, config sums near the int limits are refused
// rather than wrapped around, and a fork that cannot complete changes nothing.
#include <climits>
#include <vector>

#include "check.h"
#include "chunkvale/kv_cache.h"

using namespace chunkvale;

namespace {

CacheConfig small(int64_t capacity = 8) {
  CacheConfig c;
  c.layers = 2, c.q_heads = 4, c.kv_heads = 2, c.head_dim = 64, c.chunk_size = 16;
  c.capacity_chunks = capacity;
  return c;
}

// Runs a prefill of `n` prompt tokens for a new sequence; returns its id.
int64_t prefill(KVCache& cache, int n, int32_t first_token) {
  std::vector<int32_t> toks(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) toks[size_t(i)] = first_token + i;
  const int64_t s = cache.add_sequence(toks).first;
  Step step = cache.plan({PlanEntry{s, n, {}}});
  const auto& cfg = cache.config();
  std::vector<float> kv(size_t(n) * cfg.kv_heads * cfg.head_dim, 0.5f);
  for (int l = 0; l < cfg.layers; ++l) {
    TensorView t = tensor_view(kv.data(), DType::Float32, n, cfg.kv_heads, cfg.head_dim);
    cache.append(l, step, t, t);
  }
  step.commit();
  return s;
}

void config_sums_do_not_wrap() {
  CacheConfig c = small();
  c.eviction.enabled = true;
  c.eviction.budget_tokens = 1 << 20;
  c.eviction.sink_chunks = INT_MAX;  // (sink + window) * chunk_size wrapped to a small number
  c.eviction.window_chunks = INT_MAX;
  CHECK_THROWS(c.validate(), ValueError, "eviction.budget_tokens");
  c = small();
  c.eviction.enabled = true;
  c.eviction.budget_tokens = int64_t(1) << 40;
  c.eviction.sink_chunks = 1;
  c.eviction.window_chunks = 2;
  c.eviction.topk_chunks = INT_MAX;  // sink + window + top-k wrapped negative: any device_chunks passed
  c.eviction.device_chunks = 8;
  CHECK_THROWS(c.validate(), ValueError, "eviction.device_chunks");
  c = small();
  c.layers = INT_MAX;  // bytes_per_chunk would overflow
  CHECK_THROWS(c.validate(), ValueError, "layers");
  c = small();
  c.kv_heads = 1 << 20, c.q_heads = 1 << 20;
  CHECK_THROWS(c.validate(), ValueError, "heads");
  c = small();
  c.capacity_chunks = (int64_t(1) << 31) - 1;
  c.layers = 1 << 16, c.kv_heads = 4, c.head_dim = 256;  // ~2^31 chunks of 2^33 bytes
  CHECK_THROWS(c.validate(), ValueError, "capacity_chunks");
  c = small();
  c.sm_scale = -1.0f;
  CHECK_THROWS(c.validate(), ValueError, "sm_scale");
  c.sm_scale = 0.0f;  // the C++ API's "default" (Python: None)
  c.validate();
}

void arguments_are_named() {
  KVCache cache(small());
  const int64_t s = prefill(cache, 20, 100);
  std::vector<float> buf(16 * 64);
  CHECK_THROWS(cache.read_tile(2, 0, 0, 0, buf.data()), ValueError, "layer: expected a layer in 0..1, got 2");
  CHECK_THROWS(cache.read_tile(0, 8, 0, 0, buf.data()), ValueError, "slot: expected a chunk id in 0..7, got 8");
  CHECK_THROWS(cache.read_tile(0, 0, 2, 0, buf.data()), ValueError, "kv: expected");
  CHECK_THROWS(cache.read_tile(0, 0, 0, -1, buf.data()), ValueError, "head: expected a KV head in 0..1, got -1");
  CHECK_THROWS(cache.read_tile(0, 0, 0, 0, nullptr), ValueError, "dst");
  CHECK_THROWS(cache.chunk_residency(-1, 0), ValueError, "layer");
  CHECK_THROWS(cache.read_digest(0, 0, 0, buf.data()), ValueError, "eviction");
  CHECK_THROWS(cache.fork(s, 0), ValueError, "n: expected an integer in 1..4096 (children per fork call), got 0");
  CHECK_THROWS(cache.fork(s, kMaxForkChildren + 1), ValueError, "n:");
  CHECK_THROWS(cache.fork(s, INT_MAX), ValueError, "n:");
  CHECK_THROWS(cache.fork(12345, 1), KeyError, "seq");
  CHECK_THROWS(cache.add_sequence({}), ValueError, "token_ids");
  CHECK_THROWS(cache.add_sequence({1}, "", -2), ValueError, "max_reuse");
  CHECK_THROWS(cache.plan({PlanEntry{s, 0, {}}}), ValueError, "n_new");
  CHECK_THROWS(cache.plan({}), ValueError, "entries");
}

// fork is all or nothing: when the pool cannot hold every child's private tail, no child
// is made, no chunk pinned and no id used.
void failed_fork_changes_nothing() {
  KVCache cache(small(8));
  const int64_t s = prefill(cache, 20, 1);  // one shared full chunk + a partial tail
  const CacheStats before = cache.stats();
  CHECK_THROWS(cache.fork(s, 100), CapacityError, "fork");
  const CacheStats after = cache.stats();
  CHECK(after.sequences == before.sequences && after.chunks_in_use == before.chunks_in_use &&
        after.chunks_shared == before.chunks_shared && after.tokens_cached == before.tokens_cached);
  const std::vector<int64_t> kids = cache.fork(s, 3);  // what fits works, ids follow the parent's
  CHECK(kids.size() == 3 && kids[0] == s + 1 && kids[2] == s + 3);
  CHECK(cache.stats().sequences == 4 && cache.stats().chunks_shared == 1);
  for (int64_t k : kids) CHECK(cache.sequence_length(k) == 20);
  // A parent without a partial tail needs no slots, but n is still bounded.
  KVCache full(small(8));
  const int64_t f = prefill(full, 32, 500);
  CHECK_THROWS(full.fork(f, 1 << 20), ValueError, "n:");
  CHECK(full.stats().sequences == 1);
  CHECK(full.fork(f, kMaxForkChildren).size() == size_t(kMaxForkChildren));
  CHECK(full.stats().sequences == 1 + kMaxForkChildren);
}

}  // namespace

int main() {
  config_sums_do_not_wrap();
  arguments_are_named();
  failed_fork_changes_nothing();
  return finish("api_errors");
}
