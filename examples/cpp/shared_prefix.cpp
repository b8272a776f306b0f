// Two requests share a system prompt: the second skips prefill for it, both decode a
// few tokens, and the cache reports what sharing saved.
#include <chunkvale/kv_cache.h>

#include <cstdio>
#include <vector>

using namespace chunkvale;

static TensorView view(std::vector<float>& v, int64_t rows, int64_t heads, int64_t dim) {
  return tensor_view(v.data(), DType::Float32, rows, heads, dim);
}

// One model step: K/V/Q would come from the model's projections; constants here.
static void run(KVCache& cache, const std::vector<PlanEntry>& batch) {
  const CacheConfig& c = cache.config();
  Step step = cache.plan(batch);
  int64_t rows = step.num_tokens();
  std::vector<float> k(size_t(rows) * c.kv_heads * c.head_dim, 0.5f), v(k.size(), 1.0f);
  std::vector<float> q(size_t(rows) * c.q_heads * c.head_dim, 0.1f), out(q.size());
  for (int layer = 0; layer < c.layers; ++layer) {
    cache.append(layer, step, view(k, rows, c.kv_heads, c.head_dim), view(v, rows, c.kv_heads, c.head_dim));
    cache.attention(layer, step, view(q, rows, c.q_heads, c.head_dim), view(out, rows, c.q_heads, c.head_dim));
  }
  step.commit();  // the step's tokens are cached now; reads such as stats() never commit
}

int main() {
  CacheConfig cfg;
  cfg.layers = 4;
  cfg.q_heads = 8;
  cfg.kv_heads = 2;
  cfg.head_dim = 64;
  cfg.chunk_size = 32;
  cfg.capacity_chunks = 256;
  KVCache cache(cfg);

  std::vector<int32_t> system_prompt(512);
  for (size_t i = 0; i < system_prompt.size(); ++i) system_prompt[i] = int32_t(1000 + i);
  auto a = system_prompt, b = system_prompt;
  a.insert(a.end(), {1, 2, 3});
  b.insert(b.end(), {4, 5});

  auto [sa, cached_a] = cache.add_sequence(a);
  run(cache, {{sa, int64_t(a.size()) - cached_a, {}}});
  auto [sb, cached_b] = cache.add_sequence(b);  // finds the system prompt cached
  run(cache, {{sb, int64_t(b.size()) - cached_b, {}}});
  for (int t = 0; t < 8; ++t) run(cache, {{sa, 0, {42}}, {sb, 0, {43}}});

  CacheStats s = cache.stats();
  std::printf("request b reused %lld of %zu prompt tokens\n", (long long)cached_b, b.size());
  std::printf("chunks in use %lld (shared %lld), tokens saved by sharing %lld\n",
              (long long)s.chunks_in_use, (long long)s.chunks_shared, (long long)s.tokens_saved_by_sharing);
  return cached_b == 512 ? 0 : 1;
}
