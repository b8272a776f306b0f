// KVCache, the step's life: plan (and needs, its question without the step), append and
// attention per layer, and the one explicit change a step makes: commit, or cancel. Every call
// that starts new work (here plan; add_sequence, fork, remove and clear in kv_cache.cpp) first
// commits a step appended in every layer that nobody committed, then ends it.
#include "chunkvale/kv_cache.h"

#include <algorithm>

#include "admission.h"
#include "call_checks.h"
#include "chunk_selection.h"
#include "chunk_store.h"
#include "sequence_table.h"
#include "step.h"

namespace chunkvale {

// ---- the open step ----

void KVCache::commit_open() {
  step_->commit(*seqs_);
  handle_->state = Step::State::Committed;
}

void KVCache::commit_complete() {
  if (step_ && !step_->committed && step_->layers_appended == cfg_.layers) commit_open();
}

void KVCache::refuse_open(const char* caller) const {
  if (step_ && !step_->committed)
    throw ValueError(std::string(caller) + ": step " + std::to_string(step_->id) + " is still open (appended in " +
                     std::to_string(step_->layers_appended) + " of " + std::to_string(cfg_.layers) +
                     " layers); append every layer or cancel(step) first");
}

void KVCache::start_work(const char* caller, const std::function<void()>& room) {
  commit_complete();
  refuse_open(caller);
  room();
  end_step();
}

void KVCache::end_step() {
  if (!step_) return;
  for (int32_t c : step_->deferred_free) store_->free_chunk(c);
  planner_->recycle(*step_);
  step_.reset();
  handle_.reset();
}

const PlannedStep& KVCache::open_step(const Step& step, const char* arg) const {
  if (!step_ || step_->id != step.id()) {
    const std::string open = step_ ? "step " + std::to_string(step_->id) + " is open" : "no step is open";
    const std::string given = step.cancelled() ? " (cancelled)" : step.committed() ? " (committed, then ended)" : "";
    throw ValueError(std::string(arg) + ": expected the open step, got step " + std::to_string(step.id()) + given +
                     " (" + open + "; a step is valid until the next plan/add_sequence/fork/remove/clear of its "
                     "own cache)");
  }
  return *step_;
}

Step KVCache::handle_of(const PlannedStep& st) {
  auto h = std::make_shared<Step::Shared>();
  h->id = st.id;
  h->num_tokens = st.plan.num_tokens;
  h->seq_ids.reserve(st.plan.seqs.size());
  h->row_offsets.reserve(st.plan.seqs.size() + 1);
  for (const StepSeq& s : st.plan.seqs) {
    h->seq_ids.push_back(s.seq_id);
    h->row_offsets.push_back(s.row_begin);
  }
  h->row_offsets.push_back(st.plan.num_tokens);
  h->positions = st.plan.positions;
  h->cache = this;
  return Step(h);
}

void KVCache::drop_open() {
  store_->cancelled(*step_);
  std::vector<int32_t> freed;
  step_->cancel(*seqs_, freed);
  for (int32_t c : freed) store_->free_chunk(c);
  planner_->recycle(*step_);
  handle_->state = Step::State::Cancelled;
  step_.reset();
  handle_.reset();
}

// ---- public API ----

StepNeeds KVCache::needs(const std::vector<PlanEntry>& entries) const {
  std::lock_guard<std::mutex> g(mu_);
  const int64_t need = check_entries(*seqs_, entries, cfg_.chunk_size);  // its errors first, as plan()'s
  if (step_ && !step_->committed && step_->layers_appended == cfg_.layers)  // what plan() would see is not here yet
    throw ValueError("needs: step " + std::to_string(step_->id) + " is appended in every layer but not committed "
                     "(needs() is a read and commits nothing); commit() or cancel() it first");
  refuse_open("needs");
  return step_needs(admission(), entries, need);
}

Step KVCache::plan(const std::vector<PlanEntry>& entries) {
  std::lock_guard<std::mutex> g(mu_);
  commit_complete();  // validation reads committed lengths
  const int64_t need = check_entries(*seqs_, entries, cfg_.chunk_size);
  start_work("plan", [&] { require_step(step_needs(admission(), entries, need)); });
  std::unique_ptr<PlannedStep> st = planner_->build(entries, *seqs_, tree_, [this] { return store_->take_chunk(); });
  Step handle = handle_of(*st);
  step_ = std::move(st);
  handle_ = handle.s_;
  return handle;
}

void KVCache::append(int layer, const Step& step, const TensorView& k, const TensorView& v, const ExecContext& ctx) {
  std::lock_guard<std::mutex> g(mu_);
  check_index("layer", layer, cfg_.layers, "a layer");
  const PlannedStep& st = open_step(step, "step");
  if (st.appended[size_t(layer)])
    throw ValueError("layer: layer " + std::to_string(layer) + " was already appended in step " +
                     std::to_string(st.id));
  const int rows = st.plan.num_tokens;
  check_tensor3(k, "k", device_, cfg_.dtype, rows, cfg_.kv_heads, cfg_.head_dim);
  check_tensor3(v, "v", device_, cfg_.dtype, rows, cfg_.kv_heads, cfg_.head_dim);
  store_->check();
  store_->append(layer, st, k, v, ctx);
  step_->appended[size_t(layer)] = 1;
  ++step_->layers_appended;
}

void KVCache::attention(int layer, const Step& step, const TensorView& q, const TensorView& out, const TensorView* lse,
                        const ExecContext& ctx) {
  std::lock_guard<std::mutex> g(mu_);
  check_index("layer", layer, cfg_.layers, "a layer");
  const PlannedStep& st = open_step(step, "step");
  if (!st.appended[size_t(layer)])
    throw ValueError("layer: attention for layer " + std::to_string(layer) + " of step " + std::to_string(st.id) +
                     " needs append(layer, step, k, v) first");
  check_attention_args(cfg_, device_, st.plan.num_tokens, q, out, lse);
  store_->check();
  const StepPlan* plan = &st.plan;
  if (cfg_.eviction.enabled && layer >= cfg_.eviction.dense_layers) {
    BackendScorer scorer(*backend_->digests(), layer, q, ctx);
    const LayerPlans kept = selector_->select(st, scorer);
    if (kept.per_head) return store_->attention_per_head(layer, st, kept.plans, q, out, lse, ctx);
    if (kept.plans) plan = kept.plans;
  }
  store_->attention(layer, st, *plan, q, out, lse, ctx);
}

void KVCache::commit(const Step& step) {
  std::lock_guard<std::mutex> g(mu_);
  if (step.committed()) return;  // idempotent, also once the step has ended
  const PlannedStep& st = open_step(step, "step");
  if (st.layers_appended < cfg_.layers)
    throw ValueError("step: step " + std::to_string(st.id) + " was appended in " +
                     std::to_string(st.layers_appended) + " of " + std::to_string(cfg_.layers) +
                     " layers; expected every layer appended before commit()");
  commit_open();
}

void KVCache::cancel(const Step& step) {
  std::lock_guard<std::mutex> g(mu_);
  open_step(step, "step");
  if (step_->committed)
    throw ValueError("step: step " + std::to_string(step_->id) +
                     " is committed; it can no longer be cancelled (Step.committed says so without an error)");
  drop_open();
}

bool KVCache::cancel_if_open(const Step& step) {
  std::lock_guard<std::mutex> g(mu_);
  if (step.committed()) return false;  // state changes under this lock: read again here
  if (step.cancelled()) return true;
  open_step(step, "step");  // an open step is this cache's open step
  drop_open();
  return true;
}

const StepPlan& KVCache::step_plan(const Step& step) const {
  std::lock_guard<std::mutex> g(mu_);
  return open_step(step, "step").plan;
}

void KVCache::require_step(const StepNeeds& n) {
  const AdmissionView v = admission();
  require(v, n, Resource::PoolChunks, "plan");
  store_->check();
  if (!v.evicts()) return;
  require(v, n, Resource::DeviceChunks, "plan");
  store_->reserve_host(std::min(n.host_blocks, v.host_free));  // memory for the backups, before anything changes
  require(v, n, Resource::HostBlocks, "plan");
}

}  // namespace chunkvale
