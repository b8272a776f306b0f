#include "chunk_store.h"

#include <stdexcept>

#include "tiered_store.h"

namespace chunkvale {

DeviceStore::DeviceStore(const CacheConfig& cfg, Backend& backend, ChunkPool& pool, PrefixTree& tree)
    : cfg_(cfg), backend_(backend), digests_(backend.digests()), pool_(pool), tree_(tree) {}

int32_t DeviceStore::take_chunk() {
  int32_t s = pool_.alloc();
  if (s >= 0) return s;
  s = tree_.reclaim_one();  // least recently used cached prefix chunk
  if (s < 0) throw std::logic_error("chunkvale internal error: no slot after require_slots");
  free_chunk(s);
  return pool_.alloc();
}

void DeviceStore::free_chunk(int32_t chunk) { pool_.free(chunk); }

void DeviceStore::append(int layer, const Step& step, const TensorView& k, const TensorView& v,
                         const ExecContext& ctx) {
  backend_.append(layer, step.plan, k, v, ctx);
  if (digests_)  // chunks this step fills get their digests while their keys are hot
    digests_->update_digests(layer, step.filled.data(), step.filled.data(), step.filled.size(), ctx);
}

void DeviceStore::attention(int layer, const Step&, const StepPlan& plan, const TensorView& q, const TensorView& out,
                            const TensorView* lse, const ExecContext& ctx) {
  backend_.attention(layer, plan, q, out, lse, ctx);
}

void DeviceStore::attention_per_head(int layer, const Step&, const StepPlan* plans, const TensorView& q,
                                     const TensorView& out, const TensorView* lse, const ExecContext& ctx) {
  backend_.attention_per_head(layer, plans, q, out, lse, ctx);
}

void DeviceStore::copy_chunk(int32_t src, int32_t dst, int32_t n_tokens) {
  backend_.copy_chunk(Backend::kAllLayers, src, dst, n_tokens, ExecContext{});
}

void DeviceStore::read_tile(int layer, int32_t chunk, int kv, int head, float* dst) {
  backend_.inspect().read_tile(layer, chunk, kv, head, dst);
}

std::string DeviceStore::residency(int, int32_t) const { return "device"; }

std::unique_ptr<DeviceStore> make_chunk_store(const CacheConfig& cfg, Backend& backend, ChunkPool& pool,
                                              PrefixTree& tree, ChunkSelector& selector) {
  if (cfg.eviction.host_tier()) return std::make_unique<TieredStore>(cfg, backend, pool, tree, selector);
  return std::make_unique<DeviceStore>(cfg, backend, pool, tree);
}

}  // namespace chunkvale
