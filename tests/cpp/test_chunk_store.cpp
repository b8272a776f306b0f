// Where chunks live, alone: the plain store allocates (reclaiming cached prefix) and passes
// through; the tiered store backs filled chunks up, evicts the least recently used, reads a
// host-only chunk from its copy and recalls it into a copy.
#include <stdexcept>
#include <vector>

#include "backend_factory.h"
#include "check.h"
#include "chunk_store_factory.h"
#include "chunkvale/kv_cache.h"

using namespace chunkvale;

namespace {
constexpr int C = 16, D = 64;

CacheConfig config(bool host_tier) {
  CacheConfig c;
  c.layers = 2, c.q_heads = 1, c.kv_heads = 1, c.head_dim = D, c.chunk_size = C, c.capacity_chunks = 8;
  c.threads = 1;
  if (host_tier) {
    c.eviction.enabled = true;
    c.eviction.budget_tokens = 3 * C;
    c.eviction.sink_chunks = 1, c.eviction.window_chunks = 1, c.eviction.topk_chunks = 1;
    c.eviction.dense_layers = 1;  // layer 1 evicts
    c.eviction.device_chunks = 3;
  }
  return c;
}

struct Fixture {
  CacheConfig cfg;
  std::unique_ptr<Backend> backend;
  ChunkPool pool;
  PrefixTree tree{C};
  SequenceTable seqs{tree, C};
  StepPlanner planner;
  ChunkSelector selector;
  std::unique_ptr<ChunkStore> store;
  explicit Fixture(bool host_tier)
      : cfg(config(host_tier)), backend(make_backend(cfg, cfg.capacity_chunks)), pool(cfg.capacity_chunks),
        planner(cfg), selector(cfg.eviction, cfg.chunk_size, cfg.kv_heads, planner.params()),
        store(make_chunk_store(cfg, *backend, pool, tree, selector)) {}
  // As in ~KVCache: the backend first, it drains queued backups that still write into the
  // store's host blocks (ASan saw the worker copy into freed memory otherwise).
  ~Fixture() { backend.reset(); }

  // Prefills `n` tokens of a new sequence, `per_step` a step, K = V = step value + row / 100.
  int64_t prefill(int n, int per_step, float value) {
    const int64_t id = seqs.add(tree.root(""), {}, [] { return -1; }, std::vector<int32_t>(size_t(n), int32_t(value)), 0);
    for (int done = 0; done < n; done += per_step, value += 1) {
      auto st = planner.build({PlanEntry{id, per_step, {}}}, seqs, tree, [this] { return store->take_chunk(); });
      std::vector<float> kv(size_t(per_step) * D);
      for (int r = 0; r < per_step; ++r)
        for (int d = 0; d < D; ++d) kv[size_t(r) * D + d] = value + float(r) / 100;
      const TensorView t = tensor_view(kv.data(), DType::Float32, per_step, 1, D);
      for (int l = 0; l < cfg.layers; ++l) store->append(l, *st, t, t, ExecContext{});
      st->commit(seqs);
      for (int32_t c : st->deferred_free) store->free_chunk(c);
      planner.recycle(*st);
    }
    return id;
  }
  float tile_at(int layer, int32_t chunk, int row) {
    std::vector<float> t(size_t(C) * D);
    store->read_tile(layer, chunk, 0, 0, t.data());
    return t[size_t(row) * D];
  }
};

void plain_store_allocates_and_reclaims() {
  Fixture f(false);
  CHECK(f.store->residency(1, 0) == "device" && f.store->evict_from() == 2 && f.store->host_free() == 0);
  const int64_t a = f.prefill(2 * C, C, 1.0f);
  CHECK(f.tile_at(0, f.seqs.get(a, "a").chunk(1), 3) == 2.03f);
  std::vector<int32_t> freed;
  f.seqs.remove(a, freed);
  for (int32_t c : freed) f.store->free_chunk(c);
  CHECK(f.tree.cached_nodes() == 2);
  for (int i = 0; i < 6; ++i) f.store->take_chunk();  // the free ones
  f.store->take_chunk();                              // then cached prefix, reclaimed
  f.store->take_chunk();
  CHECK(f.tree.cached_nodes() == 0 && f.pool.free_count() == 0);
  CHECK_THROWS(f.store->take_chunk(), std::logic_error, "internal");
}

void tiered_store_backs_up_evicts_and_recalls() {
  Fixture f(true);
  CHECK(f.store->evict_from() == 1);
  const int64_t a = f.prefill(3 * C, C, 1.0f);  // 3 chunks: the layer's every device slot
  const int32_t a0 = f.seqs.get(a, "a").chunk(0), a1 = f.seqs.get(a, "a").chunk(1);
  CHECK(f.store->residency(1, a0) == "device+host" && f.store->residency(0, a0) == "device");
  f.prefill(C, C, 7.0f);  // one more chunk: the least recently used (a0) leaves the device
  CHECK(f.store->residency(1, a0) == "host" && f.store->residency(1, a1) == "device+host");
  CHECK(f.tile_at(1, a0, 5) == 1.05f);  // read from its host copy
  // A copy from a host-only chunk recalls it straight into the copy's slot (evicting a1).
  const int32_t dst = f.store->take_chunk();
  f.store->check_copies(a0);
  f.store->copy_chunk(a0, dst, 6);
  CHECK(f.store->residency(1, dst) == "device" && f.store->residency(1, a1) == "host");
  CHECK(f.tile_at(1, dst, 5) == 1.05f && f.tile_at(0, dst, 5) == 1.05f);
  CacheStats c = f.store->counts();
  CHECK(c.evict_backups == 4 && c.evict_recalls == 1 && c.evict_evictions == 2 && c.evict_device_slots_in_use == 3);
  CHECK(c.evict_bytes_to_host == 4 * int64_t(f.cfg.layer_chunk_bytes()));
  f.store->free_chunk(dst);
  CHECK(f.store->residency(1, dst) == "none" && f.store->counts().evict_device_slots_in_use == 2);
}
}  // namespace

int main() {
  plain_store_allocates_and_reclaims();
  tiered_store_backs_up_evicts_and_recalls();
  return finish("chunk_store");
}
