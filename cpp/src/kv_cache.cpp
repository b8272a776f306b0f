// KVCache: the locked front. It validates each call, runs the guard every call that starts
// new work shares (start_work), and delegates: the sequence table (sequence_table.h), the
// step and its plan (step.h), admission (admission.h), chunk selection (chunk_selection.h)
// and where chunks live (chunk_store.h: on the device, or the host tier).
#include "chunkvale/kv_cache.h"

#include <algorithm>
#include <limits>

#include "admission.h"
#include "backend_factory.h"
#include "call_checks.h"
#include "chunk_selection.h"
#include "chunk_store.h"
#include "part_counts.h"
#include "sequence_table.h"
#include "step.h"

namespace chunkvale {

KVCache::KVCache(const CacheConfig& config)
    : cfg_((config.validate(), config)), pool_(cfg_.resolved_capacity()), tree_(cfg_.chunk_size) {
  backend_ = make_backend(cfg_, cfg_.resolved_capacity());
  require_abilities(cfg_, *backend_);  // asked once, here
  device_ = cfg_.device == "cuda" ? TensorView::Device::CUDA : TensorView::Device::CPU;
  seqs_ = std::make_unique<SequenceTable>(tree_, cfg_.chunk_size);
  planner_ = std::make_unique<StepPlanner>(cfg_);
  selector_ = std::make_unique<ChunkSelector>(cfg_.eviction, cfg_.chunk_size, cfg_.kv_heads, backend_->digests(),
                                              planner_->params());
  store_ = make_chunk_store(cfg_, *backend_, pool_, tree_, *selector_);
}

KVCache::~KVCache() {
  // The backend first: it drains queued backups, which still write into the store's host blocks.
  backend_.reset();
}

// ---- the step's lifecycle ----

// A step whose every layer was appended is committed the first time any call looks at the
// cache; it stays open for attention until a call that starts new work ends it.
void KVCache::commit_if_complete() {
  if (step_ && !step_->committed && step_->layers_appended == cfg_.layers) step_->commit(*seqs_);
}

void KVCache::refuse_open(const char* caller) const {
  if (step_ && !step_->committed)
    throw ValueError(std::string(caller) + ": step " + std::to_string(step_->id) + " is still open (appended in " +
                     std::to_string(step_->layers_appended) + " of " + std::to_string(cfg_.layers) +
                     " layers); append every layer or cancel(step) first");
}

void KVCache::start_work(const char* caller, const std::function<void()>& room) {
  commit_if_complete();
  refuse_open(caller);
  room();
  end_step();
}

void KVCache::end_step() {
  if (!step_) return;
  for (int32_t c : step_->deferred_free) store_->free_chunk(c);
  planner_->recycle(*step_);
  step_.reset();
}

const Step& KVCache::open_step(uint64_t step, const char* arg) const {
  if (!step_ || step_->id != step) {
    std::string open = step_ ? "step " + std::to_string(step_->id) + " is open" : "no step is open";
    throw ValueError(std::string(arg) + ": expected the open step, got step " + std::to_string(step) + " (" + open +
                     "; a plan is valid for its own step only)");
  }
  return *step_;
}

AdmissionView KVCache::admission() const {
  AdmissionView v;
  v.cfg = &cfg_;
  v.seqs = seqs_.get();
  v.pool_free = pool_.free_count();
  v.pool_capacity = pool_.capacity();
  v.cached_chunks = tree_.cached_nodes();
  v.freed_later = step_ ? int64_t(step_->deferred_free.size()) : 0;
  v.evict_from = store_->evict_from();
  v.host_free = store_->host_free();
  return v;
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

// ---- public API ----

std::pair<int64_t, int64_t> KVCache::add_sequence(const std::vector<int32_t>& tokens, const std::string& ns,
                                                  int64_t max_reuse) {
  std::lock_guard<std::mutex> g(mu_);
  if (tokens.empty()) throw ValueError("token_ids: expected a non-empty list of token ids, got []");
  if (max_reuse < -1) throw ValueError("max_reuse: expected None or an integer >= 0, got " + std::to_string(max_reuse));
  const int C = cfg_.chunk_size;
  const int64_t limit = max_reuse < 0 ? int64_t(tokens.size()) : std::min<int64_t>(max_reuse, tokens.size());
  TreeNode* root = nullptr;
  PrefixMatch m;
  const Sequence* tail_src = nullptr;  // a live sequence's private tail continuing the match
  start_work("add_sequence", [&] {
    root = tree_.find_root(ns);
    m = tree_.match(root, tokens.data(), limit);
    if (root) tail_src = seqs_->tail_source(root, m, tokens, limit, m.partial_len);
    if (m.partial_len == 0) return;
    // The copy needs a chunk; cached chunks we are about to pin can't be reclaimed for it.
    AdmissionView v = admission();
    for (TreeNode* n : m.path) v.freed_later -= n->live == 0;
    if (!tail_src && m.partial->live == 0) --v.freed_later;
    const StepNeeds n = tail_needs(v, 1, 1);
    require(v, n, Resource::PoolChunks, "add_sequence");
    require(v, n, Resource::DeviceChunks, "add_sequence", true);
    store_->check();
    store_->check_copies(tail_src ? tail_src->tail.front() : m.partial->slot);
  });
  // Nothing below can fail. Copy-on-diverge: the matched head of a chunk becomes our tail.
  const int64_t cached = int64_t(m.path.size()) * C + m.partial_len;
  const int64_t id = seqs_->add(root ? root : tree_.root(ns), m.path, [&]() -> int32_t {
    if (m.partial_len == 0) return -1;
    TreeNode* pin = tail_src ? nullptr : m.partial;
    if (pin) tree_.acquire(pin);  // so reclaiming can't take the source
    const int32_t slot = store_->take_chunk();
    store_->copy_chunk(tail_src ? tail_src->tail.front() : m.partial->slot, slot, m.partial_len);
    if (pin) tree_.release(pin);
    return slot;
  }, tokens, cached);
  reused_prompt_tokens_ += cached;
  return {id, cached};
}

StepNeeds KVCache::needs(const std::vector<PlanEntry>& entries) {
  std::lock_guard<std::mutex> g(mu_);
  commit_if_complete();  // validation reads committed lengths
  const int64_t need = check_entries(*seqs_, entries, cfg_.chunk_size);
  refuse_open("plan");  // as plan() would; the step is not ended: asking changes nothing
  return step_needs(admission(), entries, need);
}

StepNeeds KVCache::request_needs(int64_t prompt_tokens, int64_t max_new_tokens, int n) const {
  return chunkvale::request_needs(cfg_, pool_.capacity(), prompt_tokens, max_new_tokens, n);
}

uint64_t KVCache::plan(const std::vector<PlanEntry>& entries) {
  std::lock_guard<std::mutex> g(mu_);
  commit_if_complete();  // validation reads committed lengths
  const int64_t need = check_entries(*seqs_, entries, cfg_.chunk_size);
  start_work("plan", [&] { require_step(step_needs(admission(), entries, need)); });
  step_ = planner_->build(entries, *seqs_, tree_, [this] { return store_->take_chunk(); });
  return step_->id;
}

void KVCache::append(int layer, uint64_t step, const TensorView& k, const TensorView& v, const ExecContext& ctx) {
  std::lock_guard<std::mutex> g(mu_);
  check_index("layer", layer, cfg_.layers, "a layer");
  const Step& st = open_step(step, "step");
  if (st.appended[size_t(layer)])
    throw ValueError("layer: layer " + std::to_string(layer) + " was already appended in step " + std::to_string(step));
  const int rows = st.plan.num_tokens;
  check_tensor3(k, "k", device_, cfg_.dtype, rows, cfg_.kv_heads, cfg_.head_dim);
  check_tensor3(v, "v", device_, cfg_.dtype, rows, cfg_.kv_heads, cfg_.head_dim);
  store_->check();
  store_->append(layer, st, k, v, ctx);
  step_->appended[size_t(layer)] = 1;
  ++step_->layers_appended;
}

void KVCache::attention(int layer, uint64_t step, const TensorView& q, const TensorView& out, const TensorView* lse,
                        const ExecContext& ctx) {
  std::lock_guard<std::mutex> g(mu_);
  check_index("layer", layer, cfg_.layers, "a layer");
  const Step& st = open_step(step, "step");
  if (!st.appended[size_t(layer)])
    throw ValueError("layer: attention for layer " + std::to_string(layer) + " of step " + std::to_string(step) +
                     " needs append(layer, step, k, v) first");
  check_attention_args(cfg_, device_, st.plan.num_tokens, q, out, lse);
  store_->check();
  const StepPlan* plan = &st.plan;
  if (cfg_.eviction.enabled && layer >= cfg_.eviction.dense_layers) {
    const LayerPlans kept = selector_->select(layer, st, q, ctx);
    if (kept.per_head) return store_->attention_per_head(layer, st, kept.plans, q, out, lse, ctx);
    if (kept.plans) plan = kept.plans;
  }
  store_->attention(layer, st, *plan, q, out, lse, ctx);
}

void KVCache::cancel(uint64_t step) {
  std::lock_guard<std::mutex> g(mu_);
  open_step(step, "step");
  commit_if_complete();
  if (step_->committed)
    throw ValueError("step: step " + std::to_string(step) +
                     " was appended in every layer and is committed; it can no longer be cancelled");
  store_->cancelled(*step_);
  std::vector<int32_t> freed;
  step_->cancel(*seqs_, freed);
  for (int32_t c : freed) store_->free_chunk(c);
  planner_->recycle(*step_);
  step_.reset();
}

std::vector<int64_t> KVCache::fork(int64_t seq, int n) {
  std::lock_guard<std::mutex> g(mu_);
  const Sequence& s = seqs_->get(seq, "seq");
  if (n < 1 || n > kMaxForkChildren)
    throw ValueError("n: expected an integer in 1.." + std::to_string(kMaxForkChildren) +
                     " (children per fork call), got " + std::to_string(n));
  commit_if_complete();  // the tail's length counts committed tokens
  const int32_t tail_tokens = int32_t(s.length() - int64_t(s.path.size()) * cfg_.chunk_size);
  const int64_t tails = tail_tokens > 0 ? n : 0;
  SequenceTable::Children children;
  start_work("fork", [&] {
    const AdmissionView v = admission();
    const StepNeeds need = tail_needs(v, tails, tails);
    require(v, need, Resource::PoolChunks, "fork");
    require(v, need, Resource::DeviceChunks, "fork", true);
    store_->check();
    if (tails) store_->check_copies(s.tail.front());
    // All or nothing: every allocation (the children, their ids, room in the table) happens
    // before the cache changes; std::bad_alloc here leaves it as it was.
    children = seqs_->prepare_children(s, n);
  });
  if (tails)
    for (int64_t id : children.ids) {
      const int32_t slot = store_->take_chunk();  // cannot fail: admission counted it
      store_->copy_chunk(s.tail.front(), slot, tail_tokens);
      children.seqs.at(id)->tail.push_back(slot);
    }
  seqs_->adopt(children);
  return children.ids;
}

void KVCache::remove(int64_t seq) {
  std::lock_guard<std::mutex> g(mu_);
  seqs_->get(seq, "seq");
  start_work("remove", [] {});
  std::vector<int32_t> freed;
  seqs_->remove(seq, freed);
  for (int32_t c : freed) store_->free_chunk(c);
}

void KVCache::clear() {
  std::lock_guard<std::mutex> g(mu_);
  start_work("clear", [] {});
  for (int32_t c : tree_.reclaim_all()) store_->free_chunk(c);
}

int64_t KVCache::sequence_length(int64_t seq) {
  std::lock_guard<std::mutex> g(mu_);
  commit_if_complete();
  return seqs_->get(seq, "seq").length();
}

std::vector<int32_t> KVCache::sequence_slots(int64_t seq) {
  std::lock_guard<std::mutex> g(mu_);
  commit_if_complete();
  return seqs_->chunks_of(seqs_->get(seq, "seq"));
}

// The one place a CacheStats is assembled: the cache's tables here, and what each part counted.
CacheStats KVCache::stats() {
  std::lock_guard<std::mutex> g(mu_);
  commit_if_complete();
  CacheStats st;
  st.capacity_chunks = pool_.capacity();
  st.chunks_in_use = pool_.in_use();
  st.chunks_free = pool_.free_count();
  st.chunks_shared = tree_.shared_nodes();
  st.chunks_cached = tree_.cached_nodes();
  st.peak_chunks = pool_.peak();
  st.sequences = seqs_->size();
  st.tokens_cached = seqs_->tokens_cached();
  // What the live sequences would hold without sharing, minus what they do hold.
  const int64_t held = pool_.in_use() - tree_.cached_nodes();
  st.tokens_saved_by_sharing = std::max<int64_t>(0, seqs_->chunks_held() - held) * cfg_.chunk_size;
  st.reused_prompt_tokens = reused_prompt_tokens_;
  st.bytes_per_chunk = int64_t(cfg_.bytes_per_chunk());
  add_counts(st, planner_->counts());
  add_counts(st, selector_->counts());
  add_counts(st, store_->counts());
  return st;
}

StepInfo KVCache::step_info(uint64_t step) const {
  std::lock_guard<std::mutex> g(mu_);
  return open_step(step, "step").info();
}

const StepPlan& KVCache::step_plan(uint64_t step) const {
  std::lock_guard<std::mutex> g(mu_);
  return open_step(step, "step").plan;
}

void KVCache::read_digest(int layer, int32_t slot, int head, float* dst) const {
  std::lock_guard<std::mutex> g(mu_);
  check_index("layer", layer, cfg_.layers, "a layer");
  check_index("slot", slot, pool_.capacity(), "a chunk id");
  check_index("head", head, cfg_.kv_heads, "a KV head");
  if (!cfg_.eviction.enabled)
    throw ValueError("read_digest: expected a cache with eviction (digests are kept for budgeted attention "
                     "only), got one without");
  backend_->inspect().read_digest(layer, slot, head, dst);
}

void KVCache::read_tile(int layer, int32_t slot, int kv, int head, float* dst) const {
  std::lock_guard<std::mutex> g(mu_);
  check_index("layer", layer, cfg_.layers, "a layer");
  check_index("slot", slot, pool_.capacity(), "a chunk id");
  check_index("kv", kv, 2, "0 (K) or 1 (V), i.e.");
  check_index("head", head, cfg_.kv_heads, "a KV head");
  if (!dst) throw ValueError("dst: expected a buffer, got a null pointer");
  store_->read_tile(layer, slot, kv, head, dst);  // waits and settles: bookkeeping only
}

std::string KVCache::chunk_residency(int layer, int32_t slot) const {
  std::lock_guard<std::mutex> g(mu_);
  check_index("layer", layer, cfg_.layers, "a layer");
  check_index("slot", slot, pool_.capacity(), "a chunk id");
  return store_->residency(layer, slot);
}

}  // namespace chunkvale
