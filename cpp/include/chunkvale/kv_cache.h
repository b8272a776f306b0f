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
#include "chunkvale/step.h"
#include "chunkvale/step_plan.h"
#include "chunkvale/step_request.h"
#include "chunkvale/tensor.h"

namespace chunkvale {

// The parts behind the front (cpp/src).
class SequenceTable;
class PlannedStep;
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
  // Plans one step and returns it, bound to this cache: its rows and positions, commit() and
  // cancel(). A step appended in every layer and not committed yet is committed first (as
  // commit() would; not undone if this call then throws); a step missing a layer is refused
  // (ValueError). The open step ends here (and at add_sequence / fork / remove / clear).
  Step plan(const std::vector<PlanEntry>& entries);
  // What plan(entries) needs and can have now; validates entries as plan() does (same
  // exceptions) and changes nothing. plan() throws CapacityError exactly when !fits().
  // A read: a step that is open and not committed is a ValueError (commit or cancel it first).
  StepNeeds needs(const std::vector<PlanEntry>& entries) const;
  // What the largest step of one request (prompt_tokens, up to max_new_tokens per sample,
  // n samples) needs running alone in an empty cache, against what an empty cache has: the
  // pool holds its full prompt chunks plus one chunk per sample; with a host tier, every
  // chunk a prefill (or a decode within budget_tokens) attends is on the device at once.
  StepNeeds request_needs(int64_t prompt_tokens, int64_t max_new_tokens, int n) const;
  // `ctx`: where the backend runs them (the caller's CUDA stream; unused on the CPU).
  // `step` must be this cache's open step (ValueError naming `step` otherwise).
  void append(int layer, const Step& step, const TensorView& k, const TensorView& v, const ExecContext& ctx = {});
  void attention(int layer, const Step& step, const TensorView& q, const TensorView& out,
                 const TensorView* lse = nullptr, const ExecContext& ctx = {});
  // What Step::commit() does: commits the open step once every layer was appended; a no-op
  // for a committed step; ValueError naming `step` for a missing layer, a cancelled step or
  // another cache's step.
  void commit(const Step& step);
  // Drops the open step, which must not be committed: ValueError naming `step` for a
  // committed, cancelled, ended or foreign step (Step::cancel() is the lenient form).
  void cancel(const Step& step);
  // n in 1..kMaxForkChildren; all or nothing (CapacityError when the pool cannot hold the
  // children's private tails, cache unchanged).
  std::vector<int64_t> fork(int64_t seq, int n);
  void remove(int64_t seq);
  void clear();  // drops every unreferenced cached prefix chunk

  // Reads: they never change the cache (a step is committed only by commit() or the next
  // call that starts new work).
  int64_t sequence_length(int64_t seq) const;
  CacheStats stats() const;
  // The open step's plan itself, for tests and backends' checks; valid until the step
  // ends, and not safe against a concurrent plan() from another thread.
  const StepPlan& step_plan(const Step& step) const;
  // Test/debug access to stored K/V; see Inspect::read_tile. `slot` is a chunk id as
  // sequence_slots() gives it; with the host tier, a chunk not on the device in this
  // layer is read from its host copy.
  void read_tile(int layer, int32_t slot, int kv, int head, float* dst) const;
  // Where a chunk's K/V of one layer are: "device", "host", "device+host" or "none".
  std::string chunk_residency(int layer, int32_t slot) const;
  // The digest of (layer, slot, head) as float32 [2][head_dim]; eviction only.
  void read_digest(int layer, int32_t slot, int head, float* dst) const;
  // Slots of a sequence's chunks in token order.
  std::vector<int32_t> sequence_slots(int64_t seq) const;

 private:
  friend class Step;
  // Every call that starts new work: commits a complete step, refuses while a step misses a
  // layer, runs `room` (admission and the checks that can fail; nothing changes before it
  // returns), then ends the step.
  void start_work(const char* caller, const std::function<void()>& room);
  void commit_open();      // the open step, complete, not committed yet
  void commit_complete();  // the compat rule: commits the open step if complete and not committed
  void refuse_open(const char* caller) const;  // ValueError while a step misses a layer
  void end_step();
  const PlannedStep& open_step(const Step& step, const char* arg) const;
  Step handle_of(const PlannedStep& st);  // the caller's Step for a step just planned
  bool cancel_if_open(const Step& step);  // Step::cancel(): no exception for a committed step
  void drop_open();                       // cancels the open step (not committed)
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
  std::unique_ptr<PlannedStep> step_;   // the open step, if any
  std::shared_ptr<Step::Shared> handle_;  // its caller's Step
  int64_t reused_prompt_tokens_ = 0;
  mutable std::mutex mu_;
};

}  // namespace chunkvale
