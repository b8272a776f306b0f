// "Safe from several threads" (docs/API.md): one thread drives steps through a cache with
// the host tier (backups on the worker thread, delayed so they overlap everything), while
// reader threads call stats / sequence_length / sequence_slots / read_tile /
// chunk_residency on it. The driver's outputs must be bit-identical to the same steps on
// a cache nobody else touches; run under TSan by scripts/sanitize.sh.
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "check.h"
#include "chunkvale/kv_cache.h"

using namespace chunkvale;

namespace {

CacheConfig config() {
  CacheConfig c;
  c.layers = 3, c.q_heads = 4, c.kv_heads = 2, c.head_dim = 64, c.chunk_size = 16;
  c.capacity_chunks = 64;
  c.threads = 2;
  c.eviction.enabled = true;
  c.eviction.budget_tokens = 96;
  c.eviction.sink_chunks = 1, c.eviction.window_chunks = 2, c.eviction.topk_chunks = 3;
  c.eviction.dense_layers = 1;
  c.eviction.device_chunks = 14;
  return c;
}

float value(uint64_t a, uint64_t b) {  // deterministic, in [-1, 1)
  uint64_t x = a * 0x9E3779B97F4A7C15ull ^ (b + 0x632BE59BD9B4E019ull);
  x ^= x >> 31;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 29;
  return float(double(x >> 40) / double(1ull << 23) - 1.0);
}

// Three long prompts, then decode steps alternating between pairs of them (recalls and
// evictions every step). Returns every attention output.
std::vector<float> drive(KVCache& cache, std::atomic<bool>* done) {
  const CacheConfig& c = cache.config();
  std::vector<float> outs;
  std::vector<int64_t> seqs;
  uint64_t tick = 0;
  auto step = [&](const std::vector<PlanEntry>& entries) {
    const Step st = cache.plan(entries);
    const int T = st.num_tokens();
    for (int l = 0; l < c.layers; ++l) {
      std::vector<float> k(size_t(T) * c.kv_heads * c.head_dim), v(k.size()), q(size_t(T) * c.q_heads * c.head_dim),
          out(q.size());
      ++tick;
      for (size_t i = 0; i < k.size(); ++i) k[i] = value(tick, i), v[i] = value(tick, i + k.size());
      for (size_t i = 0; i < q.size(); ++i) q[i] = 2.0f * value(tick, i + 2 * k.size());
      cache.append(l, st, tensor_view(k.data(), DType::Float32, T, c.kv_heads, c.head_dim),
                   tensor_view(v.data(), DType::Float32, T, c.kv_heads, c.head_dim));
      cache.attention(l, st, tensor_view(q.data(), DType::Float32, T, c.q_heads, c.head_dim),
                      tensor_view(out.data(), DType::Float32, T, c.q_heads, c.head_dim));
      outs.insert(outs.end(), out.begin(), out.end());
    }
  };
  for (int n : {150, 120, 90}) {
    std::vector<int32_t> toks(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) toks[size_t(i)] = n * 1000 + i;
    const int64_t s = cache.add_sequence(toks).first;
    seqs.push_back(s);
    step({PlanEntry{s, n, {}}});
  }
  for (int t = 0; t < 12; ++t)
    step({PlanEntry{seqs[size_t(t % 3)], 0, {int32_t(t)}}, PlanEntry{seqs[size_t((t + 1) % 3)], 0, {int32_t(t + 7)}}});
  if (done) done->store(true);
  return outs;
}

void readers_do_not_disturb_the_driver() {
  CacheConfig slow = config();
  slow.test_hooks.backup_delay_us = 300;
  KVCache quiet(slow), busy(slow);
  const std::vector<float> want = drive(quiet, nullptr);
  std::atomic<bool> done{false};
  std::atomic<int64_t> reads{0};
  std::vector<std::thread> readers;
  for (int r = 0; r < 3; ++r)
    readers.emplace_back([&, r] {
      std::vector<float> tile(16 * 64);
      while (!done.load()) {
        CacheStats s = busy.stats();
        CHECK(s.chunks_in_use <= s.capacity_chunks);
        for (int64_t id = 1; id <= 3; ++id) {
          try {
            busy.sequence_length(id);
            std::vector<int32_t> slots = busy.sequence_slots(id);
            if (!slots.empty()) {
              busy.chunk_residency(1 + r % 2, slots[0]);
              busy.read_tile(1 + r % 2, slots[0], r % 2, 0, tile.data());
            }
          } catch (const KeyError&) {  // not added yet
          } catch (const ValueError&) {  // a chunk with no data in that layer yet
          }
        }
        ++reads;
      }
    });
  const std::vector<float> got = drive(busy, &done);
  for (auto& t : readers) t.join();
  CHECK(reads.load() > 0);
  CHECK(got.size() == want.size());
  CHECK(std::memcmp(got.data(), want.data(), want.size() * sizeof(float)) == 0);
  CHECK(busy.stats().evict_recalls > 0 && busy.stats().evict_recalls == quiet.stats().evict_recalls);
}

}  // namespace

int main() {
  readers_do_not_disturb_the_driver();
  return finish("kv_cache_threads");
}
