// Admission's contract: needs(entries) says what plan(entries) needs and can have, and plan()
// throws CapacityError (with the same resource, needed and available) exactly when that does
// not fit; request_needs() is the Engine's per-request rule (pool and device tier).
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "chunkvale/kv_cache.h"

using namespace chunkvale;

namespace {

CacheConfig base(int64_t capacity) {
  CacheConfig c;
  c.layers = 3, c.q_heads = 2, c.kv_heads = 1, c.head_dim = 64, c.chunk_size = 16;
  c.capacity_chunks = capacity;
  c.threads = 1;
  return c;
}

CacheConfig host_tier(int64_t capacity, int64_t device_chunks, int64_t host_blocks) {
  CacheConfig c = base(capacity);
  c.eviction.enabled = true;
  c.eviction.budget_tokens = 4 * 16;
  c.eviction.sink_chunks = 1;
  c.eviction.window_chunks = 1;
  c.eviction.topk_chunks = 1;
  c.eviction.dense_layers = 1;
  c.eviction.device_chunks = device_chunks;
  c.eviction.host_bytes = host_blocks * int64_t(c.layer_chunk_bytes());
  return c;
}

bool same(const StepNeeds& a, const StepNeeds& b) {
  return a.pool_chunks == b.pool_chunks && a.pool_available == b.pool_available &&
         a.device_chunks == b.device_chunks && a.device_available == b.device_available &&
         a.host_blocks == b.host_blocks && a.host_available == b.host_available;
}

// The resource plan() must name: the first that does not fit, in the order plan checks them.
Resource first_short(const StepNeeds& n) {
  if (n.pool_chunks > n.pool_available) return Resource::PoolChunks;
  if (n.device_chunks > n.device_available) return Resource::DeviceChunks;
  return Resource::HostBlocks;
}

void run_step(KVCache& cache, Step step, std::mt19937& rng) {
  const CacheConfig& cfg = cache.config();
  const int rows = step.num_tokens();
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> k(size_t(rows) * cfg.kv_heads * cfg.head_dim), q(size_t(rows) * cfg.q_heads * cfg.head_dim),
      out(q.size());
  for (int l = 0; l < cfg.layers; ++l) {
    for (float& x : k) x = u(rng);
    for (float& x : q) x = u(rng);
    TensorView kv = tensor_view(k.data(), DType::Float32, rows, cfg.kv_heads, cfg.head_dim);
    cache.append(l, step, kv, kv);
    cache.attention(l, step, tensor_view(q.data(), DType::Float32, rows, cfg.q_heads, cfg.head_dim),
                    tensor_view(out.data(), DType::Float32, rows, cfg.q_heads, cfg.head_dim));
  }
  step.commit();  // needs() is a read: it answers once the step is committed
}

// Random steps (prefill, decode, mixed; sequences added, forked and removed): for every step
// asked, needs() agrees with what plan() does, and asking changes nothing. Counts the
// refusals per resource into `refused` (the scenarios are sized so that each happens).
void agree_over_random_steps(const CacheConfig& cfg, unsigned seed, int rounds, int* refused) {
  std::mt19937 rng(seed);
  KVCache cache(cfg);
  std::vector<int64_t> live, pending;  // pending prompt tokens per live sequence
  auto pick = [&](int n) { return int(std::uniform_int_distribution<int>(0, n - 1)(rng)); };
  for (int round = 0; round < rounds; ++round) {
    const int op = pick(10);
    if (op < 3 || live.empty()) {  // a new sequence, often sharing a prefix with earlier ones
      std::vector<int32_t> toks(size_t(1 + pick(90)));
      const int32_t family = pick(3);
      for (size_t i = 0; i < toks.size(); ++i) toks[i] = family * 1000 + int32_t(i < 40 ? i : 500 + pick(50));
      try {
        auto [id, cached] = cache.add_sequence(toks);
        live.push_back(id);
        pending.push_back(int64_t(toks.size()) - cached);
      } catch (const CapacityError& e) {
        CHECK(e.needed > e.available);
      }
      continue;
    }
    if (op == 3) {  // remove one
      const size_t i = size_t(pick(int(live.size())));
      cache.remove(live[i]);
      live.erase(live.begin() + long(i));
      pending.erase(pending.begin() + long(i));
      continue;
    }
    if (op == 4) {  // fork one
      const size_t i = size_t(pick(int(live.size())));
      try {
        for (int64_t c : cache.fork(live[i], 1 + pick(3))) {
          live.push_back(c);
          pending.push_back(pending[i]);
        }
      } catch (const CapacityError& e) {
        CHECK(e.needed > e.available);
        CHECK(e.resource == Resource::PoolChunks || e.resource == Resource::DeviceChunks);
      }
      continue;
    }
    // A step over a random subset of the live sequences: prompt pieces or one decode token
    // (sometimes a few explicit tokens: an extend).
    std::vector<PlanEntry> entries;
    std::vector<size_t> which;
    for (size_t i = 0; i < live.size(); ++i) {
      if (pick(3) == 0) continue;
      PlanEntry e;
      e.seq = live[i];
      if (pending[i] > 0)
        e.count = 1 + pick(int(pending[i]));
      else
        e.tokens.assign(size_t(pick(5) == 0 ? 1 + pick(20) : 1), 7 + pick(50));
      entries.push_back(e);
      which.push_back(i);
    }
    if (entries.empty()) continue;
    const CacheStats before = cache.stats();
    const StepNeeds n = cache.needs(entries);
    const CacheStats after = cache.stats();
    CHECK(before.chunks_in_use == after.chunks_in_use && before.chunks_cached == after.chunks_cached &&
          before.evict_device_slots_in_use == after.evict_device_slots_in_use &&
          before.evict_host_bytes_in_use == after.evict_host_bytes_in_use);
    CHECK(same(n, cache.needs(entries)));  // asking twice gives the same answer
    if (!cfg.eviction.host_tier()) CHECK(n.device_chunks == 0 && n.device_available == 0 && n.host_blocks == 0);
    try {
      const Step step = cache.plan(entries);
      EXPECT(n.fits(), "plan() took a step needs() refused: pool %lld/%lld device %lld/%lld host %lld/%lld",
             (long long)n.pool_chunks, (long long)n.pool_available, (long long)n.device_chunks,
             (long long)n.device_available, (long long)n.host_blocks, (long long)n.host_available);
      run_step(cache, step, rng);
      for (size_t k = 0; k < entries.size(); ++k)
        if (entries[k].tokens.empty()) pending[which[k]] -= entries[k].count;
    } catch (const CapacityError& e) {
      ++refused[int(e.resource)];
      EXPECT(!n.fits(), "plan() refused a step needs() said fits: %s", e.what());
      CHECK(e.resource == first_short(n));
      const int64_t need = e.resource == Resource::PoolChunks     ? n.pool_chunks
                           : e.resource == Resource::DeviceChunks ? n.device_chunks
                                                                  : n.host_blocks;
      const int64_t have = e.resource == Resource::PoolChunks     ? n.pool_available
                           : e.resource == Resource::DeviceChunks ? n.device_available
                                                                  : n.host_available;
      CHECK(e.needed == need && e.available == have);
      CHECK(cache.stats().chunks_in_use == after.chunks_in_use);  // the refusal changed nothing
      // Make room so the scenario goes on: drop the newest sequence.
      cache.remove(live.back());
      live.pop_back();
      pending.pop_back();
    }
  }
}

void needs_agrees_with_plan() {
  int refused[3] = {0, 0, 0};
  for (unsigned seed = 1; seed <= 6; ++seed) {
    agree_over_random_steps(base(12 + 4 * seed), seed, 150, refused);
    // A host tier: few device slots (the device rule refuses), few host blocks (the host rule).
    agree_over_random_steps(host_tier(40, 6 + seed, 8 + 4 * seed), 100 + seed, 150, refused);
  }
  EXPECT(refused[0] > 0 && refused[1] > 0 && refused[2] > 0, "refusals: pool %d, device %d, host %d", refused[0],
         refused[1], refused[2]);
}

void needs_validates_as_plan() {
  KVCache cache(base(8));
  const int64_t s = cache.add_sequence({1, 2, 3}).first;
  CHECK_THROWS(cache.needs({}), ValueError, "entries: expected at least one");
  CHECK_THROWS(cache.needs({PlanEntry{99, 1, {}}}), KeyError, "entries[0]: unknown sequence id 99");
  CHECK_THROWS(cache.needs({PlanEntry{s, 4, {}}}), ValueError, "n_new for sequence");
  CHECK_THROWS(cache.needs({PlanEntry{s, 1, {}}, PlanEntry{s, 1, {}}}), ValueError, "appears twice");
  CHECK_THROWS(cache.needs({PlanEntry{s, 0, {5}}}), ValueError, "still has 3 prompt tokens");
  const StepNeeds n = cache.needs({PlanEntry{s, 3, {}}});
  CHECK(n.pool_chunks == 1 && n.pool_available == 8 && n.fits());
  // A step open in some layer only: plan() would refuse, and so does needs().
  const Step step = cache.plan({PlanEntry{s, 3, {}}});
  std::vector<float> kv(3 * 64);
  TensorView t = tensor_view(kv.data(), DType::Float32, 3, 1, 64);
  cache.append(0, step, t, t);
  CHECK_THROWS(cache.needs({PlanEntry{s, 1, {}}}), ValueError, "is still open");
  cache.cancel(step);
}

// The Engine's rule for one request alone (its exactness against the scheduler's run is
// tests/test_scheduler.py's): the pool until every sample decoded once, the device tier's peak.
void request_needs_is_the_engine_rule() {
  {
    KVCache cache(base(10));
    StepNeeds n = cache.request_needs(100, 50, 1);
    CHECK(n.pool_chunks == 100 / 16 + 1 && n.pool_available == 10);
    CHECK(n.device_chunks == 0 && n.device_available == 0 && n.host_blocks == 0 && n.fits());
    n = cache.request_needs(150, 1, 2);  // 9 full chunks + one per sample
    CHECK(n.pool_chunks == 11 && !n.fits());
    n = cache.request_needs(160, 1, 2);  // whole chunks and no decode step: no chunk of their own
    CHECK(n.pool_chunks == 10 && n.fits());
    CHECK(cache.request_needs(160, 2, 2).pool_chunks == 12);  // the first decode step opens one each
    CHECK_THROWS(cache.request_needs(0, 1, 1), ValueError, "prompt_tokens");
    CHECK_THROWS(cache.request_needs(1, 0, 1), ValueError, "max_new_tokens");
    CHECK_THROWS(cache.request_needs(1, 1, 0), ValueError, "n: expected");
    CHECK_THROWS(cache.request_needs(1, 1, kMaxForkChildren + 2), ValueError, "n: expected an integer in 1..4097");
  }
  KVCache cache(host_tier(100, 8, 0));  // budget 64 tokens = 4 chunks; sink 1, window 1, top-k 1
  const int64_t C = 16, big = std::numeric_limits<int64_t>::max();
  struct Case { int64_t prompt, max_new; int n; int64_t device; };
  for (const Case& c : {Case{40, 1, 1, 3},     // prefill: 3 chunks
                        Case{40, 30, 1, 4},    // decode within the budget to 64 tokens, then 1 + 1 + 1
                        Case{200, 30, 1, 13},  // the prefill; decode beyond the budget needs 3
                        Case{40, 1, 5, 6},     // the fork: the partial chunk, 4 copies and the source
                        Case{48, 1, 5, 3},     // whole chunks: nothing to copy
                        Case{40, 5, 3, 5},     // 2 shared + 3 own at once
                        Case{40, 30, 3, 6}}) { // past 48 tokens, the oldest alone (4) beside 2 partial
    const StepNeeds r = cache.request_needs(c.prompt, c.max_new, c.n);
    EXPECT(r.device_chunks == c.device && r.device_available == 8, "prompt %lld max_new %lld n %d: device %lld, want %lld",
           (long long)c.prompt, (long long)c.max_new, c.n, (long long)r.device_chunks, (long long)c.device);
  }
  for (int64_t prompt : {int64_t(1), int64_t(40), int64_t(63), int64_t(64), int64_t(1000), big})
    for (int64_t max_new : {int64_t(1), int64_t(2), int64_t(30), int64_t(1000), big})
      for (int n : {1, 2, 5, 9}) {
        const StepNeeds r = cache.request_needs(prompt, max_new, n);  // checked arithmetic: never negative
        CHECK(r.pool_chunks >= prompt / C && r.device_chunks >= prompt / C);
        CHECK(r.device_chunks > 0 && r.fits() == (r.pool_chunks <= 100 && r.device_chunks <= 8));
      }
  // No layer evicts (every layer dense): no device rule.
  CacheConfig dense = host_tier(100, 8, 0);
  dense.eviction.dense_layers = dense.layers;
  KVCache all_dense(dense);
  const StepNeeds d = all_dense.request_needs(1000, 10, 3);
  CHECK(d.device_chunks == 0 && d.device_available == 0);
}

// Every capacity refusal carries its resource and amounts (the bindings expose them).
void capacity_errors_are_structured() {
  CHECK(std::string(resource_name(Resource::PoolChunks)) == "capacity_chunks");
  CHECK(std::string(resource_name(Resource::DeviceChunks)) == "eviction.device_chunks");
  CHECK(std::string(resource_name(Resource::HostBlocks)) == "eviction.host_bytes");
  KVCache cache(base(4));
  std::vector<int32_t> big(100, 3);
  const int64_t s = cache.add_sequence(big).first;
  try {
    cache.plan({PlanEntry{s, 100, {}}});
    CHECK(false);
  } catch (const CapacityError& e) {
    CHECK(e.resource == Resource::PoolChunks && e.needed == 7 && e.available == 4);
    CHECK(std::string(e.what()).find("capacity_chunks") != std::string::npos);
  }
}

}  // namespace

int main() {
  needs_validates_as_plan();
  request_needs_is_the_engine_rule();
  capacity_errors_are_structured();
  needs_agrees_with_plan();
  return finish("kv_cache_needs");
}
