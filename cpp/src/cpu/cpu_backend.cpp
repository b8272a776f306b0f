#include "cpu_backend.h"

#include <cstdlib>
#include <cstring>
#include <new>

#include "chunkvale/errors.h"

namespace chunkvale {

CpuBackend::CpuBackend(const CacheConfig& cfg, int64_t slots)
    : cfg_(cfg),
      slots_(slots),
      elem_(dtype_size(cfg.dtype)),
      tile_bytes_(size_t(cfg.chunk_size) * cfg.head_dim * elem_),
      slot_bytes_(2 * size_t(cfg.kv_heads) * tile_bytes_),
      exec_(cfg.dtype, cfg.head_dim, cfg.kernel_isa, cfg.threads) {
  // `slots` is the logical capacity; layers that evict hold only their device slots.
  layer_offsets(cfg.layers, int64_t(slot_bytes_), [&](int l) { return cfg.evicts_to_host(l) ? cfg.layer_slots(l) : slots; },
                layer_offset_);
  const size_t total = layer_offset_.back();
  // 64-byte aligned; pages are only touched when written, so a large capacity is cheap.
  pool_ = static_cast<uint8_t*>(std::aligned_alloc(64, (total + 63) / 64 * 64));
  if (!pool_)
    throw CapacityError(Resource::PoolChunks, slots, 0, "capacity: could not allocate " + std::to_string(total) +
                        " bytes of KV pool memory");
  if (cfg.eviction.enabled) digests_.assign(size_t(DigestView{slots, cfg.kv_heads, cfg.head_dim}.layer(cfg.layers)), 0.0f);
  if (cfg.eviction.host_tier()) backups_ = std::make_unique<CpuBackupWorker>(cfg.test_hooks.backup_delay_us);
}

CpuBackend::~CpuBackend() {
  backups_.reset();  // drains pending copies before the pool goes
  std::free(pool_);
}

LayerPool CpuBackend::layer_pool(int layer) const {
  return {pool_ + layer_offset_[size_t(layer)], PoolView::chunkvale_layout(cfg_.kv_heads, cfg_.chunk_size, cfg_.head_dim),
          cfg_.kv_heads, elem_};
}

void CpuBackend::append(int layer, const StepPlan& plan, const TensorView& k, const TensorView& v,
                        const ExecContext&) {
  const int C = cfg_.chunk_size;
  const int64_t row = int64_t(cfg_.kv_heads) * cfg_.head_dim;
  exec_.write_rows(layer_pool(layer), {static_cast<const uint8_t*>(k.data), row}, {static_cast<const uint8_t*>(v.data), row},
                   plan.num_tokens, [&](int64_t r) {
                     const StepSeq& s = plan.seqs[size_t(plan.row_seq[size_t(r)])];
                     const int64_t pos = plan.positions[size_t(r)];
                     return int64_t(plan.seq_chunks[size_t(s.chunk_begin + pos / C)]) * C + pos % C;
                   });
}

void CpuBackend::copy_chunk(int layer, int32_t src, int32_t dst, int32_t n_tokens, const ExecContext&) {
  const size_t bytes = size_t(n_tokens) * cfg_.head_dim * elem_;
  const int first = layer == kAllLayers ? 0 : layer, last = layer == kAllLayers ? cfg_.layers : layer + 1;
  for (int l = first; l < last; ++l)
    for (int kv = 0; kv < 2; ++kv)
      for (int h = 0; h < cfg_.kv_heads; ++h)
        std::memcpy(tile(l, dst, kv, h), tile(l, src, kv, h), bytes);
}

void CpuBackend::attention(int layer, const StepPlan& plan, const TensorView& q, const TensorView& out,
                           const TensorView* lse, const ExecContext&) {
  exec_.run(plan, layer_args(layer, q, out, lse));
}

void CpuBackend::attention_per_head(int layer, const StepPlan* plans, const TensorView& q, const TensorView& out,
                                    const TensorView* lse, const ExecContext&) {
  exec_.run_per_head(plans, layer_args(layer, q, out, lse), elem_);
}

LayerArgs CpuBackend::layer_args(int layer, const TensorView& q, const TensorView& out, const TensorView* lse) const {
  const AttentionShape shape = cfg_.shape();
  return chunkvale::layer_args(layer_pool(layer), shape, q.data, shape.row_elems(), out.data, shape.row_elems(),
                               lse ? static_cast<float*>(lse->data) : nullptr);
}

void CpuBackend::read_tile(int layer, int32_t slot, int kv, int head, float* dst) const {
  tile_to_float(tile(layer, slot, kv, head), cfg_.dtype, size_t(cfg_.chunk_size) * cfg_.head_dim, dst);
}

// ---- host tier: a (layer, slot) is one contiguous slot_bytes_ block ----

uint64_t CpuBackend::backup(int layer, int32_t slot, void* host_dst, const ExecContext&) {
  return backups_->submit(tile(layer, slot, 0, 0), host_dst, slot_bytes_);
}

uint64_t CpuBackend::backups_done() const { return backups_->done(); }

void CpuBackend::wait_backup(uint64_t ticket) { backups_->wait(ticket); }

void CpuBackend::recall(int layer, int32_t slot, const void* host_src, const ExecContext&) {
  std::memcpy(tile(layer, slot, 0, 0), host_src, slot_bytes_);
}

}  // namespace chunkvale
