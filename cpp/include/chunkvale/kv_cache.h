// The embeddable API: a prefix-sharing, chunked KV cache with two-phase attention.
// Every public method validates its input, is atomic (a call that throws leaves the
// cache as it was) and is safe to call from several threads.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "chunkvale/backend.h"
#include "chunkvale/cache_stats.h"
#include "chunkvale/chunk_pool.h"
#include "chunkvale/config.h"
#include "chunkvale/errors.h"
#include "chunkvale/prefix_tree.h"
#include "chunkvale/step_plan.h"
#include "chunkvale/tensor.h"

namespace chunkvale {

// One batch entry of plan(): the next `count` pending prompt tokens, or explicit tokens.
struct PlanEntry {
  int64_t seq = 0;
  int64_t count = 0;              // used when `tokens` is empty
  std::vector<int32_t> tokens;    // tokens beyond the prompt (decode)
};

// What a caller needs of a planned step: its rows and their positions.
struct StepInfo {
  int32_t num_tokens = 0;
  std::vector<int64_t> seq_ids;
  std::vector<int32_t> row_offsets;  // B + 1
  std::vector<int64_t> positions;    // per packed row, for RoPE
};

// What a step needs of each resource, against what it can have now (CapacityError's units:
// pool chunks; device chunks per evicting layer, both 0 without a host tier; host blocks,
// both 0 without one, host_available INT64_MAX when a spill file makes it unbounded).
struct StepNeeds {
  int64_t pool_chunks = 0, pool_available = 0;
  int64_t device_chunks = 0, device_available = 0;
  int64_t host_blocks = 0, host_available = 0;
  bool fits() const {
    return pool_chunks <= pool_available && device_chunks <= device_available && host_blocks <= host_available;
  }
};

class HostTier;
class Residency;

// The most children one fork() call makes (each copies its parent's token ids).
constexpr int kMaxForkChildren = 4096;

class KVCache {
 public:
  explicit KVCache(const CacheConfig& config);
  ~KVCache();
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;

  const CacheConfig& config() const { return cfg_; }

  // Returns (sequence id, leading tokens already cached).
  std::pair<int64_t, int64_t> add_sequence(const std::vector<int32_t>& tokens,
                                           const std::string& ns = "",
                                           int64_t max_reuse = -1);
  // Plans one step; returns its id. A step ends (and its plan with it) at the next
  // add_sequence / plan / fork / remove / clear, which refuse while a layer is missing.
  uint64_t plan(const std::vector<PlanEntry>& entries);
  // What plan(entries) needs and can have now; validates entries as plan() does (same
  // exceptions) and changes nothing. plan() throws CapacityError exactly when !fits().
  StepNeeds needs(const std::vector<PlanEntry>& entries);
  // What the largest step of one request (prompt_tokens, up to max_new_tokens per sample,
  // n samples) needs running alone in an empty cache, against what an empty cache has: the
  // pool holds its full prompt chunks plus one chunk per sample; with a host tier, every
  // chunk a prefill (or a decode within budget_tokens) attends is on the device at once.
  StepNeeds request_needs(int64_t prompt_tokens, int64_t max_new_tokens, int n) const;
  void append(int layer, uint64_t step, const TensorView& k, const TensorView& v);
  void attention(int layer, uint64_t step, const TensorView& q, const TensorView& out,
                 const TensorView* lse = nullptr);
  void cancel(uint64_t step);
  // n in 1..kMaxForkChildren; all or nothing (CapacityError when the pool cannot hold the
  // children's private tails, cache unchanged).
  std::vector<int64_t> fork(int64_t seq, int n);
  void remove(int64_t seq);
  void clear();  // drops every unreferenced cached prefix chunk

  // Reads; they also commit a step whose every layer was appended.
  int64_t sequence_length(int64_t seq);
  CacheStats stats();
  // A copy of the open step's rows and positions. Throws if `step` is stale.
  StepInfo step_info(uint64_t step) const;
  // The open step's plan itself, for tests and backends' checks; valid until the step
  // ends, and not safe against a concurrent plan() from another thread.
  const StepPlan& step_plan(uint64_t step) const;
  // Test/debug access to stored K/V; see Backend::read_tile. `slot` is a chunk id as
  // sequence_slots() gives it; with the host tier, a chunk not on the device in this
  // layer is read from its host copy.
  void read_tile(int layer, int32_t slot, int kv, int head, float* dst) const;
  // Where a chunk's K/V of one layer are: "device", "host", "device+host" or "none".
  std::string chunk_residency(int layer, int32_t slot) const;
  // The digest of (layer, slot, head) as float32 [2][head_dim]; eviction only.
  void read_digest(int layer, int32_t slot, int head, float* dst) const;
  // Slots of a sequence's chunks in token order.
  std::vector<int32_t> sequence_slots(int64_t seq);

 private:
  struct Sequence;
  struct OpenStep;

  Sequence& get_seq(int64_t seq, const char* arg);
  const Sequence& get_seq(int64_t seq, const char* arg) const;
  void commit_if_complete();
  void end_step(const char* caller);  // commit and close the step, or refuse if unfinished
  void commit_step();
  void seal_full_chunks(Sequence& s, std::vector<int32_t>& dropped);
  int32_t take_slot();                 // alloc, reclaiming cached prefix if needed
  // Throws CapacityError unless n slots can be had (free, reclaimable, or freed when
  // the current step ends).
  void require_slots(int64_t n, const char* what, int64_t freed_later = 0);
  const OpenStep& open_step(uint64_t step, const char* arg) const;
  void release_sequence(Sequence& s);
  bool select_chunks(int layer, const TensorView& q);
  void top_requests(int layer, const TensorView& q, int topk);
  bool decode_row(size_t i) const;
  // --- host tier ---
  void free_chunk(int32_t chunk);       // pool slot, device slots and host copies
  void drop_residency(int32_t chunk);
  void drop_host_copies(int32_t chunk);
  void wait_backup(uint64_t ticket);
  int32_t device_slot_for(int layer, int32_t chunk, uint64_t stamp);
  void make_resident(int layer, int32_t chunk, uint64_t stamp);
  // A chunk's host copy of one layer (waits for its backup; a spilled block is read and
  // verified: IOError naming eviction.spill_path when it is not what was written).
  const void* host_copy(int layer, int32_t chunk);
  void recall(int layer, int32_t slot, const void* src);  // a host copy into a device slot
  void check_host_copies(int32_t chunk);  // host_copy of every layer where chunk is off the device
  void check_host_tier();                 // reports a spill-file write that failed since the last call
  int64_t take_host_block();
  // The plan with chunk ids replaced by the layer's device slots; `need` chunks (the
  // written ones for append, the attended ones for attention) are made resident first.
  const StepPlan& to_device_slots(int layer, const StepPlan& plan, bool for_append);
  void backup_filled(int layer);
  void demote_after_prefill(int layer, const TensorView& q);
  void copy_chunk_all_layers(int32_t src, int32_t dst, int32_t n_tokens);
  int64_t open_tails() const;
  // Validates plan()'s entries; returns the new pool chunks the step takes.
  int64_t check_entries(const std::vector<PlanEntry>& entries) const;
  StepNeeds step_needs(const std::vector<PlanEntry>& entries, int64_t new_chunks) const;
  // Throws the CapacityError of the first resource (pool, device, host) `n` lacks;
  // check_host_tier() and the host reservation run between pool and device, as always.
  void require_step(const StepNeeds& n, int64_t new_chunks);
  void require_device_tails(int64_t new_tails, const char* what) const;

  CacheConfig cfg_;
  std::unique_ptr<Backend> backend_;
  TensorView::Device device_ = TensorView::Device::CPU;
  ChunkPool pool_;
  PrefixTree tree_;
  std::unordered_map<int64_t, std::unique_ptr<Sequence>> seqs_;
  int64_t next_seq_id_ = 1;
  std::unique_ptr<OpenStep> step_;
  StepPlan plan_;                  // the latest plan (reused when the batch repeats)
  uint64_t plan_tree_version_ = ~0ull;
  PlanParams plan_params_;
  // Budgeted attention scratch (reused across layers and steps).
  StepPlan layer_plan_;
  std::vector<std::vector<uint8_t>> keep_;
  std::vector<PlanSeqInput> layer_inputs_;
  std::vector<int32_t> top_;     // top_requests' indices, k per request
  std::vector<uint8_t> taken_;
  std::vector<Backend::ScoreRequest> score_reqs_;
  std::vector<int32_t> cand_lo_;
  int64_t scored_chunks_ = 0, dropped_chunks_ = 0, select_ns_ = 0, score_ns_ = 0;
  int64_t reused_prompt_tokens_ = 0;
  // Host tier (null without it).
  std::unique_ptr<HostTier> host_;
  std::unique_ptr<Residency> res_;
  uint64_t res_clock_ = 0;
  StepPlan xplan_;                     // a plan in one evicting layer's device slots
  std::vector<int32_t> need_, fill_slots_;
  mutable std::vector<uint8_t> host_scratch_;
  int64_t backups_ = 0, recalls_ = 0, evictions_ = 0, backup_waits_ = 0, bytes_to_host_ = 0,
          bytes_from_host_ = 0, residency_ns_ = 0;
  int64_t plan_rebuilds_ = 0, plan_reuses_ = 0;
  mutable std::mutex mu_;
};

}  // namespace chunkvale
