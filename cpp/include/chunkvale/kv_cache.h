// The embeddable API: a prefix-sharing, chunked KV cache with two-phase attention.
// Every public method validates its input, is atomic (a call that throws leaves the
// cache as it was) and is safe to call from several threads.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "chunkvale/backend.h"
#include "chunkvale/cache_stats.h"
#include "chunkvale/chunk_pool.h"
#include "chunkvale/config.h"
#include "chunkvale/errors.h"
#include "chunkvale/prefix_tree.h"
#include "chunkvale/step_plan.h"
#include "chunkvale/step_request.h"
#include "chunkvale/tensor.h"

namespace chunkvale {

// What a caller needs of a planned step: its rows and their positions.
struct StepInfo {
  int32_t num_tokens = 0;
  std::vector<int64_t> seq_ids;
  std::vector<int32_t> row_offsets;  // B + 1
  std::vector<int64_t> positions;    // per packed row, for RoPE
};

// The parts behind the front (cpp/src).
class SequenceTable;
class Step;
class StepPlanner;
class ChunkSelector;
class ChunkStore;
struct AdmissionView;

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
  // `ctx`: where the backend runs them (the caller's CUDA stream; unused on the CPU).
  void append(int layer, uint64_t step, const TensorView& k, const TensorView& v, const ExecContext& ctx = {});
  void attention(int layer, uint64_t step, const TensorView& q, const TensorView& out,
                 const TensorView* lse = nullptr, const ExecContext& ctx = {});
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
  // Test/debug access to stored K/V; see Inspect::read_tile. `slot` is a chunk id as
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
  // Every call that starts new work: commits a complete step, refuses while a step misses a
  // layer, runs `room` (admission and the checks that can fail; nothing changes before it
  // returns), then ends the step.
  void start_work(const char* caller, const std::function<void()>& room);
  void commit_if_complete();
  void refuse_open(const char* caller) const;  // ValueError while a step misses a layer
  void end_step();
  const Step& open_step(uint64_t step, const char* arg) const;
  AdmissionView admission() const;
  // plan()'s refusals in their order: pool, a failed spill write, device, host.
  void require_step(const StepNeeds& n);

  CacheConfig cfg_;
  std::unique_ptr<Backend> backend_;
  TensorView::Device device_ = TensorView::Device::CPU;
  ChunkPool pool_;
  PrefixTree tree_;
  std::unique_ptr<SequenceTable> seqs_;
  std::unique_ptr<StepPlanner> planner_;
  std::unique_ptr<ChunkSelector> selector_;
  std::unique_ptr<ChunkStore> store_;   // the host tier, or every chunk on the device
  std::unique_ptr<Step> step_;          // the open step, if any
  int64_t reused_prompt_tokens_ = 0;
  mutable std::mutex mu_;
};

}  // namespace chunkvale
