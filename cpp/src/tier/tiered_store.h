// The host tier as a chunk store: in each layer from eviction.dense_layers on, a chunk id
// maps to one of the layer's few device slots, to a block of host memory (or the spill
// file), or to both (residency.h). Append writes in device slots, then backs the filled
// chunks up (asynchronously, by the backend's copy engine); attention recalls what the
// plan attends, evicting the least recently used chunks that have a host copy. The dense
// layers below are plain ChunkStore layers.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "chunk_selection.h"
#include "chunk_store.h"
#include "host_tier.h"
#include "residency.h"

namespace chunkvale {

class TieredStore final : public ChunkStore {
 public:
  // The backend has a copy engine (KVCache checked).
  TieredStore(const CacheConfig& cfg, Backend& backend, ChunkPool& pool, PrefixTree& tree, ChunkSelector& selector);

  void free_chunk(int32_t chunk) override;  // pool slot, device slots and host copies
  void append(int layer, const PlannedStep& step, const TensorView& k, const TensorView& v, const ExecContext& ctx) override;
  void attention(int layer, const PlannedStep& step, const StepPlan& plan, const TensorView& q, const TensorView& out,
                 const TensorView* lse, const ExecContext& ctx) override;
  // Refused by CacheConfig::validate (one set of chunks per sequence is resident): logic_error.
  void attention_per_head(int, const PlannedStep&, const StepPlan*, const TensorView&, const TensorView&, const TensorView*,
                          const ExecContext&) override;
  void copy_chunk(int32_t src, int32_t dst, int32_t n_tokens) override;

  // Chunks a cancelled step filled hold uncommitted rows: their host copies must go, or a
  // partial chunk could be evicted and its later rows written into a fresh slot.
  void cancelled(const PlannedStep& step) override;
  void check() override { host_->check(); }
  void check_copies(int32_t chunk) override;  // host_copy of every layer where chunk is off the device
  int evict_from() const override { return res_->first_layer(); }
  int64_t host_free() const override { return host_->available(); }
  void reserve_host(int64_t n) override { host_->reserve(n); }

  void read_tile(int layer, int32_t chunk, int kv, int head, float* dst) override;
  std::string residency(int layer, int32_t chunk) const override;
  CacheStats counts() const override;

 private:
  void drop_host_copies(int32_t chunk);
  void wait_backup(uint64_t ticket);
  int32_t device_slot_for(int layer, int32_t chunk, uint64_t stamp);
  void make_resident(int layer, int32_t chunk, uint64_t stamp, const ExecContext& ctx);
  // A chunk's host copy of one layer (waits for its backup; a spilled block is read and
  // verified: IOError naming eviction.spill_path when it is not what was written).
  const void* host_copy(int layer, int32_t chunk);
  void recall(int layer, int32_t slot, const void* src, const ExecContext& ctx);  // a host copy into a device slot
  int64_t take_host_block();
  // The plan with chunk ids replaced by the layer's device slots; the chunks it needs (the
  // written ones for append, the attended ones for attention) are made resident first.
  const StepPlan& to_device_slots(int layer, const PlannedStep& step, const StepPlan& plan, bool for_append,
                                  const ExecContext& ctx);
  void backup_filled(int layer, const PlannedStep& step, const ExecContext& ctx);

  ChunkSelector& selector_;
  CopyEngine& copy_;
  SelectionRule rule_;
  // Declared before res_: a queued backup writes into host_'s blocks until the backend drains.
  std::unique_ptr<HostTier> host_;
  std::unique_ptr<Residency> res_;
  uint64_t clock_ = 0;
  StepPlan device_plan_;  // a plan in one evicting layer's device slots
  std::vector<int32_t> need_, fill_slots_;
  std::vector<uint8_t> host_scratch_;
  CacheStats counts_;  // backups, recalls, evictions, waits, bytes moved, time on residency
};

}  // namespace chunkvale
