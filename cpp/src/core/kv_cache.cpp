// KVCache: the locked front. It validates each call, runs the guard every call that starts
// new work shares (start_work, kv_cache_steps.cpp with the rest of a step's life), and
// delegates: the sequence table (sequence_table.h), the step and its plan (step.h), admission
// (admission.h), chunk selection (chunk_selection.h) and where chunks live (chunk_store.h: on
// the device, or the host tier).
#include "chunkvale/kv_cache.h"

#include <algorithm>
#include <limits>

#include "admission.h"
#include "backend_factory.h"
#include "call_checks.h"
#include "chunk_selection.h"
#include "chunk_store_factory.h"
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
  selector_ = std::make_unique<ChunkSelector>(cfg_.eviction, cfg_.chunk_size, cfg_.kv_heads, planner_->params());
  store_ = make_chunk_store(cfg_, *backend_, pool_, tree_, *selector_);
}

KVCache::~KVCache() {
  if (handle_) {  // its Step outlives the cache: an uncommitted step is gone with it
    if (!step_->committed) handle_->state = Step::State::Cancelled;
    handle_->cache = nullptr;
  }
  // The backend first: it drains queued backups, which still write into the store's host blocks.
  backend_.reset();
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

StepNeeds KVCache::request_needs(int64_t prompt_tokens, int64_t max_new_tokens, int n) const {
  return chunkvale::request_needs(cfg_, pool_.capacity(), prompt_tokens, max_new_tokens, n);
}

std::vector<int64_t> KVCache::fork(int64_t seq, int n) {
  std::lock_guard<std::mutex> g(mu_);
  const Sequence& s = seqs_->get(seq, "seq");
  if (n < 1 || n > kMaxForkChildren)
    throw ValueError("n: expected an integer in 1.." + std::to_string(kMaxForkChildren) +
                     " (children per fork call), got " + std::to_string(n));
  commit_complete();  // the tail's length counts committed tokens
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

int64_t KVCache::sequence_length(int64_t seq) const {
  std::lock_guard<std::mutex> g(mu_);
  return seqs_->get(seq, "seq").length();
}

std::vector<int32_t> KVCache::sequence_slots(int64_t seq) const {
  std::lock_guard<std::mutex> g(mu_);
  return seqs_->chunks_of(seqs_->get(seq, "seq"));
}

// The one place a CacheStats is assembled: the cache's tables here, and what each part counted.
CacheStats KVCache::stats() const {
  std::lock_guard<std::mutex> g(mu_);
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
