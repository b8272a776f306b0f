#include "chunk_store.h"

#include <stdexcept>


namespace chunkvale {

ChunkStore::ChunkStore(const CacheConfig& cfg, Backend& backend, ChunkPool& pool, PrefixTree& tree)
    : cfg_(cfg), backend_(backend), digests_(backend.digests()), pool_(pool), tree_(tree) {}

int32_t ChunkStore::take_chunk() {
  int32_t s = pool_.alloc();
  if (s >= 0) return s;
  s = tree_.reclaim_one();  // least recently used cached prefix chunk
  if (s < 0) throw std::logic_error("chunkvale internal error: no slot after require_slots");
  free_chunk(s);
  return pool_.alloc();
}

void ChunkStore::free_chunk(int32_t chunk) { pool_.free(chunk); }

void ChunkStore::append(int layer, const PlannedStep& step, const TensorView& k, const TensorView& v,
                         const ExecContext& ctx) {
  backend_.append(layer, step.plan, k, v, ctx);
  if (digests_)  // chunks this step fills get their digests while their keys are hot
    digests_->update_digests(layer, step.filled.data(), step.filled.data(), step.filled.size(), ctx);
}

void ChunkStore::attention(int layer, const PlannedStep&, const StepPlan& plan, const TensorView& q, const TensorView& out,
                            const TensorView* lse, const ExecContext& ctx) {
  backend_.attention(layer, plan, q, out, lse, ctx);
}

void ChunkStore::attention_per_head(int layer, const PlannedStep&, const StepPlan* plans, const TensorView& q,
                                     const TensorView& out, const TensorView* lse, const ExecContext& ctx) {
  backend_.attention_per_head(layer, plans, q, out, lse, ctx);
}

void ChunkStore::copy_chunk(int32_t src, int32_t dst, int32_t n_tokens) {
  backend_.copy_chunk(Backend::kAllLayers, src, dst, n_tokens, ExecContext{});
}

void ChunkStore::read_tile(int layer, int32_t chunk, int kv, int head, float* dst) {
  backend_.inspect().read_tile(layer, chunk, kv, head, dst);
}

std::string ChunkStore::residency(int, int32_t) const { return "device"; }

}  // namespace chunkvale
