#include "tiered_store.h"

#include <algorithm>
#include <chrono>
#include <stdexcept>

#include "chunkvale/errors.h"
#include "test_faults.h"

namespace chunkvale {

namespace {
int64_t ns_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

TieredStore::TieredStore(const CacheConfig& cfg, Backend& backend, ChunkPool& pool, PrefixTree& tree,
                         ChunkSelector& selector)
    : ChunkStore(cfg, backend, pool, tree), selector_(selector), copy_(*backend.copy_engine()),
      rule_(cfg.eviction, cfg.chunk_size) {
  host_ = std::make_unique<HostTier>(cfg.layer_chunk_bytes(), cfg.eviction.host_bytes, cfg.eviction.spill_path,
                                     copy_.host_memory(), TestFaults::parse(cfg.test_hooks.faults));
  res_ = std::make_unique<Residency>(std::min(cfg.eviction.dense_layers, cfg.layers), cfg.layers,
                                     cfg.resolved_capacity(), cfg.eviction.device_chunks);
}

void TieredStore::free_chunk(int32_t chunk) {
  drop_host_copies(chunk);  // waits for pending backups, so the device slots are free to reuse
  for (int l = res_->first_layer(); l < cfg_.layers; ++l)
    if (res_->slot(l, chunk) >= 0) res_->evict(l, chunk);
  pool_.free(chunk);
}

void TieredStore::wait_backup(uint64_t ticket) {
  if (ticket == 0 || ticket <= copy_.backups_done()) return;
  copy_.wait_backup(ticket);
  ++counts_.evict_backup_waits;
}

void TieredStore::drop_host_copies(int32_t chunk) {
  for (int l = res_->first_layer(); l < cfg_.layers; ++l) {
    const int64_t b = res_->host_block(l, chunk);
    if (b < 0) continue;
    wait_backup(res_->ticket(l, chunk));  // the backup still writes into the block
    host_->free(b);
    res_->clear_host(l, chunk);
  }
}

void TieredStore::cancelled(const PlannedStep& step) {
  for (int32_t c : step.filled) drop_host_copies(c);
}

int32_t TieredStore::device_slot_for(int layer, int32_t chunk, uint64_t stamp) {
  int32_t s = res_->take_free(layer);
  if (s < 0) {
    const int32_t v = res_->victim(layer, stamp);
    if (v < 0)  // admission (step_needs, tail_needs) rules this out
      throw std::logic_error("chunkvale internal error: no device slot to evict in layer " + std::to_string(layer));
    wait_backup(res_->ticket(layer, v));  // a slot is reused only after its backup completed
    res_->evict(layer, v);
    ++counts_.evict_evictions;
    s = res_->take_free(layer);
  }
  res_->place(layer, chunk, s);
  res_->touch(layer, chunk, stamp);
  return s;
}

void TieredStore::make_resident(int layer, int32_t chunk, uint64_t stamp, const ExecContext& ctx) {
  if (res_->slot(layer, chunk) >= 0) return;
  // Read (and verify) the host copy before a device slot is taken: a copy that cannot be
  // had is an error with nothing moved, never a slot holding the wrong bytes.
  const void* src = res_->host_block(layer, chunk) >= 0 ? host_copy(layer, chunk) : nullptr;
  const int32_t s = device_slot_for(layer, chunk, stamp);
  if (src) recall(layer, s, src, ctx);  // else first written in this step: nothing to recall
}

const void* TieredStore::host_copy(int layer, int32_t chunk) {
  wait_backup(res_->ticket(layer, chunk));
  host_->settle(copy_.backups_done());
  return host_->read(res_->host_block(layer, chunk), host_scratch_);
}

void TieredStore::recall(int layer, int32_t slot, const void* src, const ExecContext& ctx) {
  copy_.recall(layer, slot, src, ctx);
  ++counts_.evict_recalls;
  counts_.evict_bytes_from_host += int64_t(host_->block_bytes());
}

void TieredStore::check_copies(int32_t chunk) {
  for (int l = res_->first_layer(); l < cfg_.layers; ++l)
    if (res_->slot(l, chunk) < 0 && res_->host_block(l, chunk) >= 0) host_copy(l, chunk);
}

int64_t TieredStore::take_host_block() {
  int64_t b = host_->alloc();
  while (b < 0) {  // host memory full, no spill file: reclaim cached prefix (step_needs counted it)
    const int32_t s = tree_.reclaim_one();
    if (s < 0) throw std::logic_error("chunkvale internal error: host tier full after step_needs");
    free_chunk(s);
    b = host_->alloc();
  }
  return b;
}

const StepPlan& TieredStore::to_device_slots(int layer, const PlannedStep& step, const StepPlan& plan, bool for_append,
                                             const ExecContext& ctx) {
  auto t0 = std::chrono::steady_clock::now();
  const uint64_t stamp = ++clock_;
  const int C = cfg_.chunk_size;
  need_.clear();
  if (for_append) {  // the chunks this step writes
    for (const StepSeq& q : plan.seqs)
      for (int64_t c = q.ctx_before / C; c * C < q.total(); ++c) need_.push_back(plan.seq_chunks[size_t(q.chunk_begin + c)]);
    // Resident chunks this layer's attention is sure to use are not victims either, so
    // append does not evict what attention would recall at once (step_needs counted them).
    for (size_t k = 0; k < plan.seqs.size(); ++k) {
      const StepSeq& q = plan.seqs[k];
      const int64_t nch = q.chunk_end - q.chunk_begin;
      const SelectionRule::Range r = rule_.of(step.decodes(k), q.total(), nch);
      for (int64_t i = 0; i < nch; ++i) {
        const int32_t c = plan.seq_chunks[size_t(q.chunk_begin + i)];
        if ((!r.selects || i < r.lo || i >= r.hi) && res_->slot(layer, c) >= 0) res_->touch(layer, c, stamp);
      }
    }
  } else {  // every chunk some work unit attends
    for (const UnitChunk& u : plan.unit_chunks) need_.push_back(u.slot);
  }
  // Protect every resident chunk the step uses before taking slots for the missing ones.
  for (int32_t c : need_)
    if (res_->slot(layer, c) >= 0) res_->touch(layer, c, stamp);
  for (int32_t c : need_) make_resident(layer, c, stamp, ctx);
  device_plan_ = plan;
  for (UnitChunk& u : device_plan_.unit_chunks) u.slot = res_->slot(layer, u.slot);
  for (int32_t& c : device_plan_.seq_chunks) c = res_->slot(layer, c);  // -1: not on the device (unused)
  new_revision(device_plan_);
  counts_.evict_residency_ns += ns_since(t0);
  return device_plan_;
}

void TieredStore::backup_filled(int layer, const PlannedStep& step, const ExecContext& ctx) {
  const std::vector<int32_t>& f = step.filled;
  fill_slots_.resize(f.size());
  for (size_t i = 0; i < f.size(); ++i) fill_slots_[i] = res_->slot(layer, f[i]);
  digests_->update_digests(layer, f.data(), fill_slots_.data(), f.size(), ctx);
  host_->settle(copy_.backups_done());
  for (size_t i = 0; i < f.size(); ++i) {
    const int64_t b = take_host_block();
    const uint64_t t = copy_.backup(layer, fill_slots_[i], host_->backup_target(b), ctx);
    host_->backup_queued(b, t);
    res_->set_host(layer, f[i], b, t);
    ++counts_.evict_backups;
    counts_.evict_bytes_to_host += int64_t(host_->block_bytes());
  }
}

void TieredStore::append(int layer, const PlannedStep& step, const TensorView& k, const TensorView& v,
                         const ExecContext& ctx) {
  if (!cfg_.evicts_to_host(layer)) return ChunkStore::append(layer, step, k, v, ctx);
  backend_.append(layer, to_device_slots(layer, step, step.plan, true, ctx), k, v, ctx);
  backup_filled(layer, step, ctx);  // digests, then the asynchronous copies to the host tier
}

void TieredStore::attention(int layer, const PlannedStep& step, const StepPlan& plan, const TensorView& q,
                            const TensorView& out, const TensorView* lse, const ExecContext& ctx) {
  if (!cfg_.evicts_to_host(layer)) return ChunkStore::attention(layer, step, plan, q, out, lse, ctx);
  // Recall what the selection needs, evicting what no sequence of the step selected.
  backend_.attention(layer, to_device_slots(layer, step, plan, false, ctx), q, out, lse, ctx);
  // Prefill attends to everything; afterwards an over-budget sequence keeps the chunks that
  // score highest for its last prompt token: the others become the first eviction victims.
  auto t0 = std::chrono::steady_clock::now();
  BackendScorer scorer(*digests_, layer, q, ctx);
  for (int32_t chunk : selector_.unselected_after_prefill(step, scorer))
    if (res_->slot(layer, chunk) >= 0) res_->demote(layer, chunk);
  counts_.evict_residency_ns += ns_since(t0);
}

void TieredStore::attention_per_head(int, const PlannedStep&, const StepPlan*, const TensorView&, const TensorView&,
                                     const TensorView*, const ExecContext&) {
  throw std::logic_error("chunkvale internal error: per-KV-head selection with the host tier");
}

void TieredStore::copy_chunk(int32_t src, int32_t dst, int32_t n_tokens) {
  const ExecContext ctx;  // fork and add_sequence copy on the default stream
  for (int l = 0; l < cfg_.layers; ++l) {
    if (!cfg_.evicts_to_host(l)) {
      backend_.copy_chunk(l, src, dst, n_tokens, ctx);
      continue;
    }
    const uint64_t stamp = ++clock_;
    const int32_t from = res_->slot(l, src);
    if (from >= 0) res_->touch(l, src, stamp);
    // The source on host only is recalled straight into the copy (check_copies verified it
    // before the call changed anything).
    const void* host_src = from >= 0 ? nullptr : host_copy(l, src);
    const int32_t to = device_slot_for(l, dst, stamp);
    if (from >= 0)
      backend_.copy_chunk(l, from, to, n_tokens, ctx);
    else
      recall(l, to, host_src, ctx);
  }
}

void TieredStore::read_tile(int layer, int32_t chunk, int kv, int head, float* dst) {
  if (!cfg_.evicts_to_host(layer)) return ChunkStore::read_tile(layer, chunk, kv, head, dst);
  const int32_t dev = res_->slot(layer, chunk);
  if (dev >= 0) return backend_.inspect().read_tile(layer, dev, kv, head, dst);
  const int64_t b = res_->host_block(layer, chunk);
  if (b < 0)
    throw ValueError("read_tile: chunk " + std::to_string(chunk) + " holds no data in layer " + std::to_string(layer));
  wait_backup(res_->ticket(layer, chunk));
  host_->settle(copy_.backups_done());
  const size_t tile = size_t(cfg_.chunk_size) * cfg_.head_dim;
  const uint8_t* p = static_cast<const uint8_t*>(host_->read(b, host_scratch_));
  tile_to_float(p + (size_t(kv) * cfg_.kv_heads + size_t(head)) * tile * dtype_size(cfg_.dtype), cfg_.dtype, tile, dst);
}

std::string TieredStore::residency(int layer, int32_t chunk) const {
  if (!cfg_.evicts_to_host(layer)) return "device";
  const bool dev = res_->slot(layer, chunk) >= 0, host = res_->host_block(layer, chunk) >= 0;
  return dev && host ? "device+host" : dev ? "device" : host ? "host" : "none";
}

CacheStats TieredStore::counts() const {
  CacheStats c = counts_;  // what moved, and below what the tiers hold now
  c.evict_device_chunks = cfg_.eviction.device_chunks;
  c.evict_device_slots_in_use = res_->slots_in_use();
  c.evict_host_bytes_in_use = host_->ram_bytes_in_use();
  c.evict_spill_bytes_in_use = host_->spill_bytes_in_use();
  return c;
}

}  // namespace chunkvale
