#include "chunkvale/kv_cache.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <limits>
#include <stdexcept>
#include <thread>
#include <unordered_set>

#include "backend_factory.h"
#include "host_tier.h"
#include "plan_builder.h"
#include "residency.h"

namespace chunkvale {

struct KVCache::Sequence {
  int64_t id = 0;
  TreeNode* root = nullptr;
  std::vector<TreeNode*> path;   // sealed full chunks (acquired), in token order
  std::vector<int32_t> tail;     // private slots after the path (last may be partial)
  std::vector<int32_t> tokens;   // committed token ids
  std::vector<int32_t> pending;  // prompt tokens not yet planned
  size_t pending_head = 0;
  int64_t length() const { return int64_t(tokens.size()); }
  int64_t pending_count() const { return int64_t(pending.size() - pending_head); }
};

struct KVCache::OpenStep {
  uint64_t id = 0;
  std::vector<int64_t> seq_ids;
  std::vector<std::vector<int32_t>> new_tokens;  // per batch entry
  std::vector<uint8_t> from_prompt;
  std::vector<int32_t> reserved;                 // slots added to each tail this step
  std::vector<uint8_t> appended;                 // per layer
  int layers_appended = 0;
  bool committed = false;                        // tokens are cached; attention still allowed
  std::vector<int32_t> deferred_free;            // deduplicated slots, freed when the step ends
  std::vector<int32_t> filled;                   // slots this step fills (digests, eviction only)
};

namespace {
std::string id_str(int64_t id) { return std::to_string(id); }
// Whether a sequence selects (select_chunks' rule), and its candidate range [lo, hi): the
// chunks outside it (sinks, window) are always attended. Only a decode row selects: one new
// token given explicitly; prompt tokens attend to everything, even planned one at a time.
bool selects(const EvictionConfig& ev, int topk, bool decode, int64_t total, int64_t nch, int64_t& lo,
             int64_t& hi) {
  lo = std::min<int64_t>(ev.sink_chunks, nch);
  hi = std::max(lo, nch - ev.window_chunks);
  return decode && total > ev.budget_tokens && hi - lo > topk;
}
// Step ids are unique across caches, so a step can't be passed to the wrong cache.
std::atomic<uint64_t> g_next_step_id{1};
std::atomic<uint64_t> g_next_plan_revision{1};
void new_revision(StepPlan& p) { p.revision = g_next_plan_revision++; }
// Throws ValueError naming `arg` unless 0 <= v < n (`what`: what the range is).
void check_index(const char* arg, int64_t v, int64_t n, const char* what) {
  if (v < 0 || v >= n)
    throw ValueError(std::string(arg) + ": expected " + what + " in 0.." + std::to_string(n - 1) + ", got " +
                     std::to_string(v));
}
int64_t ns_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

KVCache::KVCache(const CacheConfig& config)
    : cfg_((config.validate(), config)),
      pool_(cfg_.resolved_capacity()),
      tree_(cfg_.chunk_size) {
  backend_ = make_backend(cfg_, cfg_.resolved_capacity());
  plan_params_.chunk_size = cfg_.chunk_size;
  plan_params_.kv_heads = cfg_.kv_heads;
  plan_params_.group = cfg_.group();
  plan_params_.threads = cfg_.threads > 0 ? cfg_.threads : int(std::max(1u, std::thread::hardware_concurrency()));
  plan_params_.share_threshold = cfg_.share_threshold;
  device_ = cfg_.device == "cuda" ? TensorView::Device::CUDA : TensorView::Device::CPU;
  if (cfg_.eviction.host_tier()) {
    backend_->open_host_tier();  // a backend without a host tier refuses here
    host_ = std::make_unique<HostTier>(cfg_.layer_chunk_bytes(), cfg_.eviction.host_bytes,
                                       cfg_.eviction.spill_path, backend_->host_memory(),
                                       TestFaults::from_env());
    res_ = std::make_unique<Residency>(std::min(cfg_.eviction.dense_layers, cfg_.layers), cfg_.layers,
                                       cfg_.resolved_capacity(), cfg_.eviction.device_chunks);
  }
}

KVCache::~KVCache() {
  // The backend first: it drains queued backups, which still write into host_'s blocks.
  backend_.reset();
}

// ---- helpers ----

KVCache::Sequence& KVCache::get_seq(int64_t seq, const char* arg) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end())
    throw KeyError(std::string(arg) + ": unknown sequence id " + id_str(seq) +
                   " (never added, or removed)");
  return *it->second;
}

const KVCache::Sequence& KVCache::get_seq(int64_t seq, const char* arg) const {
  return const_cast<KVCache*>(this)->get_seq(seq, arg);
}

// Batch entry i of the open step decodes: one new token, given explicitly (not a prompt token).
bool KVCache::decode_row(size_t i) const {
  return plan_.seqs[i].n_new == 1 && !step_->from_prompt[i];
}

int32_t KVCache::take_slot() {
  int32_t s = pool_.alloc();
  if (s >= 0) return s;
  s = tree_.reclaim_one();  // least recently used cached prefix chunk
  if (s < 0) throw std::logic_error("chunkvale internal error: no slot after require_slots");
  free_chunk(s);
  return pool_.alloc();
}

void KVCache::require_slots(int64_t n, const char* what, int64_t freed_later) {
  int64_t avail = pool_.free_count() + tree_.cached_nodes() + freed_later;
  if (n > avail) {
    throw CapacityError(Resource::PoolChunks, n, avail, std::string(what) + ": needs " + std::to_string(n) + " free chunks, but only " +
                        std::to_string(avail) + " of " + std::to_string(pool_.capacity()) + " can be had (" +
                        std::to_string(pool_.free_count()) + " free, " + std::to_string(tree_.cached_nodes()) +
                        " reclaimable cached prefix); every other chunk is held by a live sequence. "
                        "Remove sequences or raise capacity_chunks.");
  }
}

// A step whose every layer was appended is committed the first time any call looks
// at the cache; it stays open for attention until a call that starts new work ends it.
void KVCache::commit_if_complete() {
  if (step_ && !step_->committed && step_->layers_appended == cfg_.layers) commit_step();
}

void KVCache::end_step(const char* caller) {
  if (!step_) return;
  commit_if_complete();
  if (!step_->committed)
    throw ValueError(std::string(caller) + ": step " + std::to_string(step_->id) +
                     " is still open (appended in " + std::to_string(step_->layers_appended) +
                     " of " + std::to_string(cfg_.layers) +
                     " layers); append every layer or cancel(step) first");
  for (int32_t slot : step_->deferred_free) free_chunk(slot);
  step_.reset();
}

void KVCache::commit_step() {
  OpenStep& st = *step_;
  for (size_t i = 0; i < st.seq_ids.size(); ++i) {
    Sequence& s = *seqs_.at(st.seq_ids[i]);
    const auto& nt = st.new_tokens[i];
    s.tokens.insert(s.tokens.end(), nt.begin(), nt.end());
    if (st.from_prompt[i]) {
      s.pending_head += nt.size();
      if (s.pending_head == s.pending.size()) {
        s.pending.clear();
        s.pending_head = 0;
      }
    }
    seal_full_chunks(s, st.deferred_free);
  }
  st.committed = true;
}

// Full private chunks join the tree. If another sequence already holds the same chunk
// under the same parent (identical prompts prefilled together), ours is dropped and
// theirs shared.
void KVCache::seal_full_chunks(Sequence& s, std::vector<int32_t>& dropped) {
  const int C = cfg_.chunk_size;
  size_t sealed = 0;
  while (sealed < s.tail.size() && int64_t(s.path.size() + 1) * C <= s.length()) {
    TreeNode* parent = s.path.empty() ? s.root : s.path.back();
    const int32_t* key = s.tokens.data() + s.path.size() * size_t(C);
    int32_t slot = s.tail[sealed++];
    TreeNode* node = tree_.child(parent, key);
    if (node) {
      dropped.push_back(slot);  // this step's attention may still read it
    } else {
      node = tree_.insert(parent, key, slot);
    }
    tree_.acquire(node);
    s.path.push_back(node);
  }
  s.tail.erase(s.tail.begin(), s.tail.begin() + long(sealed));
}

const KVCache::OpenStep& KVCache::open_step(uint64_t step, const char* arg) const {
  if (!step_ || step_->id != step) {
    std::string open = step_ ? "step " + std::to_string(step_->id) + " is open" : "no step is open";
    throw ValueError(std::string(arg) + ": expected the open step, got step " +
                     std::to_string(step) + " (" + open + "; a plan is valid for its own step only)");
  }
  return *step_;
}

void KVCache::release_sequence(Sequence& s) {
  for (TreeNode* n : s.path) tree_.release(n);
  for (int32_t slot : s.tail) free_chunk(slot);
  s.path.clear();
  s.tail.clear();
}

// ---- host tier: the core decides residency, the backend moves the bytes ----

void KVCache::free_chunk(int32_t chunk) {
  if (res_) drop_residency(chunk);
  pool_.free(chunk);
}

void KVCache::wait_backup(uint64_t ticket) {
  if (ticket == 0 || ticket <= backend_->backups_done()) return;
  backend_->wait_backup(ticket);
  ++backup_waits_;
}

void KVCache::drop_host_copies(int32_t chunk) {
  for (int l = res_->first_layer(); l < cfg_.layers; ++l) {
    int64_t b = res_->host_block(l, chunk);
    if (b < 0) continue;
    wait_backup(res_->ticket(l, chunk));  // the backup still writes into the block
    host_->free(b);
    res_->clear_host(l, chunk);
  }
}

void KVCache::drop_residency(int32_t chunk) {
  drop_host_copies(chunk);  // waits for pending backups, so the device slots are free to reuse
  for (int l = res_->first_layer(); l < cfg_.layers; ++l)
    if (res_->slot(l, chunk) >= 0) res_->evict(l, chunk);
}

int32_t KVCache::device_slot_for(int layer, int32_t chunk, uint64_t stamp) {
  int32_t s = res_->take_free(layer);
  if (s < 0) {
    int32_t v = res_->victim(layer, stamp);
    if (v < 0)  // step_needs / require_device_tails rule this out
      throw std::logic_error("chunkvale internal error: no device slot to evict in layer " + std::to_string(layer));
    wait_backup(res_->ticket(layer, v));  // a slot is reused only after its backup completed
    res_->evict(layer, v);
    ++evictions_;
    s = res_->take_free(layer);
  }
  res_->place(layer, chunk, s);
  res_->touch(layer, chunk, stamp);
  return s;
}

void KVCache::make_resident(int layer, int32_t chunk, uint64_t stamp) {
  if (res_->slot(layer, chunk) >= 0) return;
  // Read (and verify) the host copy before a device slot is taken: a copy that cannot be
  // had is an error with nothing moved, never a slot holding the wrong bytes.
  const void* src = res_->host_block(layer, chunk) >= 0 ? host_copy(layer, chunk) : nullptr;
  const int32_t s = device_slot_for(layer, chunk, stamp);
  if (src) recall(layer, s, src);  // else first written in this step: nothing to recall
}

const void* KVCache::host_copy(int layer, int32_t chunk) {
  wait_backup(res_->ticket(layer, chunk));
  host_->settle(backend_->backups_done());
  return host_->read(res_->host_block(layer, chunk), host_scratch_);
}

void KVCache::recall(int layer, int32_t slot, const void* src) {
  backend_->recall(layer, slot, src);
  ++recalls_;
  bytes_from_host_ += int64_t(host_->block_bytes());
}

void KVCache::check_host_copies(int32_t chunk) {
  if (!res_) return;
  for (int l = res_->first_layer(); l < cfg_.layers; ++l)
    if (res_->slot(l, chunk) < 0 && res_->host_block(l, chunk) >= 0) host_copy(l, chunk);
}

void KVCache::check_host_tier() {
  if (host_) host_->check();
}

int64_t KVCache::take_host_block() {
  int64_t b = host_->alloc();
  while (b < 0) {  // host memory full, no spill file: reclaim cached prefix (step_needs counted it)
    int32_t s = tree_.reclaim_one();
    if (s < 0) throw std::logic_error("chunkvale internal error: host tier full after step_needs");
    free_chunk(s);
    b = host_->alloc();
  }
  return b;
}

const StepPlan& KVCache::to_device_slots(int layer, const StepPlan& plan, bool for_append) {
  auto t0 = std::chrono::steady_clock::now();
  const uint64_t stamp = ++res_clock_;
  const int C = cfg_.chunk_size;
  need_.clear();
  if (for_append) {  // the chunks this step writes
    for (const StepSeq& q : plan.seqs)
      for (int64_t c = q.ctx_before / C; c * C < q.total(); ++c)
        need_.push_back(plan.seq_chunks[size_t(q.chunk_begin + c)]);
    // Resident chunks this layer's attention is sure to use are not victims either, so
    // append does not evict what attention would recall at once (step_needs counted them).
    const int topk = cfg_.eviction.resolved_topk(C);
    for (size_t k = 0; k < plan.seqs.size(); ++k) {
      const StepSeq& q = plan.seqs[k];
      const int64_t nch = q.chunk_end - q.chunk_begin;
      int64_t lo, hi;
      const bool sel = selects(cfg_.eviction, topk, decode_row(k), q.total(), nch, lo, hi);
      for (int64_t i = 0; i < nch; ++i) {
        const int32_t c = plan.seq_chunks[size_t(q.chunk_begin + i)];
        if ((!sel || i < lo || i >= hi) && res_->slot(layer, c) >= 0) res_->touch(layer, c, stamp);
      }
    }
  } else {  // every chunk some work unit attends
    for (const UnitChunk& u : plan.unit_chunks) need_.push_back(u.slot);
  }
  // Protect every resident chunk the step uses before taking slots for the missing ones.
  for (int32_t c : need_)
    if (res_->slot(layer, c) >= 0) res_->touch(layer, c, stamp);
  for (int32_t c : need_) make_resident(layer, c, stamp);
  xplan_ = plan;
  for (UnitChunk& u : xplan_.unit_chunks) u.slot = res_->slot(layer, u.slot);
  for (int32_t& c : xplan_.seq_chunks) c = res_->slot(layer, c);  // -1: not on the device (unused)
  new_revision(xplan_);
  residency_ns_ += ns_since(t0);
  return xplan_;
}

void KVCache::backup_filled(int layer) {
  const std::vector<int32_t>& f = step_->filled;
  fill_slots_.resize(f.size());
  for (size_t i = 0; i < f.size(); ++i) fill_slots_[i] = res_->slot(layer, f[i]);
  backend_->update_digests(layer, f.data(), fill_slots_.data(), f.size(), cfg_.eviction.digest);
  host_->settle(backend_->backups_done());
  for (size_t i = 0; i < f.size(); ++i) {
    const int64_t b = take_host_block();
    const uint64_t t = backend_->backup(layer, fill_slots_[i], host_->backup_target(b));
    host_->backup_queued(b, t);
    res_->set_host(layer, f[i], b, t);
    ++backups_;
    bytes_to_host_ += int64_t(host_->block_bytes());
  }
}

void KVCache::copy_chunk_all_layers(int32_t src, int32_t dst, int32_t n_tokens) {
  if (!res_) {
    backend_->copy_chunk(src, dst, n_tokens);
    return;
  }
  for (int l = 0; l < cfg_.layers; ++l) {
    if (!cfg_.evicts_to_host(l)) {
      backend_->copy_chunk_layer(l, src, dst, n_tokens);
      continue;
    }
    const uint64_t stamp = ++res_clock_;
    const int32_t from = res_->slot(l, src);
    if (from >= 0) res_->touch(l, src, stamp);
    // The source on host only is recalled straight into the copy (check_host_copies
    // verified it before the call changed anything).
    const void* host_src = from >= 0 ? nullptr : host_copy(l, src);
    const int32_t to = device_slot_for(l, dst, stamp);
    if (from >= 0) {
      backend_->copy_chunk_layer(l, from, to, n_tokens);
    } else {
      recall(l, to, host_src);
    }
  }
}

int64_t KVCache::open_tails() const {
  int64_t n = 0;
  for (const auto& kv : seqs_) n += kv.second->length() % cfg_.chunk_size != 0;
  return n;
}

void KVCache::require_device_tails(int64_t new_tails, const char* what) const {
  if (!res_ || res_->first_layer() >= cfg_.layers || new_tails == 0) return;
  // Partial chunks have no host copy, so they never leave the device; +1: the copy source.
  const int64_t need = open_tails() + new_tails + 1;
  if (need > cfg_.eviction.device_chunks)
    throw CapacityError(Resource::DeviceChunks, need, cfg_.eviction.device_chunks,
                        std::string(what) + ": needs " + std::to_string(need) +
                        " device chunks per evicting layer (every live sequence's partial chunk stays on "
                        "the device, plus the copy), but eviction.device_chunks=" +
                        std::to_string(cfg_.eviction.device_chunks) +
                        ". Remove sequences or raise eviction.device_chunks.");
}

StepNeeds KVCache::step_needs(const std::vector<PlanEntry>& entries, int64_t new_chunks) const {
  StepNeeds out;
  const int64_t deferred = step_ ? int64_t(step_->deferred_free.size()) : 0;
  out.pool_chunks = new_chunks;
  out.pool_available = pool_.free_count() + tree_.cached_nodes() + deferred;
  if (!res_ || res_->first_layer() >= cfg_.layers) return out;
  const EvictionConfig& ev = cfg_.eviction;
  const int C = cfg_.chunk_size;
  const int topk = ev.resolved_topk(C);
  const int64_t E = cfg_.layers - res_->first_layer();
  // Device: what one evicting layer holds at once in this step. The same rule as
  // select_chunks: a decoding sequence over budget keeps sinks + window + top-k.
  std::unordered_set<int32_t> must;
  std::unordered_set<int64_t> in_step;
  int64_t fresh = 0, filled = 0;
  for (const PlanEntry& e : entries) {
    const Sequence& s = *seqs_.at(e.seq);
    in_step.insert(e.seq);
    const int64_t n = e.tokens.empty() ? e.count : int64_t(e.tokens.size());
    const int64_t total = s.length() + n;
    const int64_t nch = (total + C - 1) / C;
    const int64_t have = int64_t(s.path.size() + s.tail.size());
    filled += total / C - s.length() / C;
    int64_t lo, hi;
    const bool sel = selects(ev, topk, e.tokens.size() == 1, total, nch, lo, hi);
    for (int64_t i = 0; i < nch; ++i) {
      if (sel && i >= lo && i < hi) continue;
      if (i >= have)
        ++fresh;
      else
        must.insert(i < int64_t(s.path.size()) ? s.path[size_t(i)]->slot : s.tail[size_t(i) - s.path.size()]);
    }
    if (sel) fresh += topk;
  }
  for (const auto& kv : seqs_)  // partial chunks of the others stay too
    if (!in_step.count(kv.first) && kv.second->length() % C != 0) ++fresh;
  out.device_chunks = int64_t(must.size()) + fresh;
  out.device_available = ev.device_chunks;
  // Host: one block per chunk this step fills, per evicting layer; reclaimable cached
  // prefix the pool does not take for this step gives its blocks back.
  out.host_blocks = filled * E;
  out.host_available = host_->available();
  if (out.host_available != std::numeric_limits<int64_t>::max()) {
    const int64_t cached_left = std::max<int64_t>(
        0, tree_.cached_nodes() - std::max<int64_t>(0, new_chunks - pool_.free_count() - deferred));
    out.host_available += cached_left * E;
  }
  return out;
}

void KVCache::require_step(const StepNeeds& n, int64_t new_chunks) {
  const int64_t deferred = step_ ? int64_t(step_->deferred_free.size()) : 0;
  require_slots(new_chunks, "plan", deferred);
  check_host_tier();
  if (!res_ || res_->first_layer() >= cfg_.layers) return;
  const EvictionConfig& ev = cfg_.eviction;
  if (n.device_chunks > n.device_available)
    throw CapacityError(Resource::DeviceChunks, n.device_chunks, n.device_available,
                        "plan: this step needs up to " + std::to_string(n.device_chunks) +
                        " chunks on the device in each evicting layer (every chunk of sequences that "
                        "prefill or are within budget, sinks + window + top-k of the others, every live "
                        "sequence's partial chunk), but eviction.device_chunks=" +
                        std::to_string(ev.device_chunks) +
                        ". Plan fewer tokens or sequences per step, or raise eviction.device_chunks.");
  const int64_t avail = host_->available();
  host_->reserve(std::min(n.host_blocks, avail));  // memory for the backups, before anything changes
  if (n.host_blocks > n.host_available)
    throw CapacityError(Resource::HostBlocks, n.host_blocks, n.host_available,
                        "plan: the host tier needs " + std::to_string(n.host_blocks) + " more blocks of " +
                        std::to_string(host_->block_bytes()) +
                        " bytes (K/V of one chunk in one layer) for the chunks this step fills, but "
                        "eviction.host_bytes=" + std::to_string(ev.host_bytes) + " has room for " +
                        std::to_string(avail) + " (and " + std::to_string(n.host_available - avail) +
                        " from reclaimable cached prefix). Set eviction.spill_path, raise "
                        "eviction.host_bytes, or remove sequences.");
}

// ---- public API ----

std::pair<int64_t, int64_t> KVCache::add_sequence(const std::vector<int32_t>& tokens,
                                                  const std::string& ns, int64_t max_reuse) {
  std::lock_guard<std::mutex> g(mu_);
  if (tokens.empty()) throw ValueError("token_ids: expected a non-empty list of token ids, got []");
  if (max_reuse < -1)
    throw ValueError("max_reuse: expected None or an integer >= 0, got " + std::to_string(max_reuse));
  commit_if_complete();
  if (step_ && !step_->committed) end_step("add_sequence");  // refuses: a layer is missing
  const int C = cfg_.chunk_size;
  int64_t limit = max_reuse < 0 ? int64_t(tokens.size()) : std::min<int64_t>(max_reuse, tokens.size());

  TreeNode* root = tree_.find_root(ns);
  PrefixMatch m = tree_.match(root, tokens.data(), limit);
  const int64_t k = int64_t(m.path.size());
  // A live sequence's private tail that continues the matched path is a copy source too
  // (e.g. a system prompt that ends mid-chunk, while its first request still runs).
  const Sequence* tail_src = nullptr;
  int32_t partial_len = m.partial_len;
  if (root) {
    const TreeNode* at = k ? m.path.back() : root;
    const int64_t rest = std::min<int64_t>(limit - k * C, C);
    for (const auto& kv : seqs_) {
      const Sequence& o = *kv.second;
      if (o.tail.empty() || int64_t(o.path.size()) != k || (k ? o.path.back() : o.root) != at) continue;
      const int64_t avail = std::min<int64_t>(o.length() - k * C, rest);
      int32_t n = 0;
      while (n < avail && o.tokens[size_t(k * C + n)] == tokens[size_t(k * C + n)]) ++n;
      if (n > partial_len) {
        partial_len = n;
        tail_src = &o;
      }
    }
  }

  if (partial_len > 0) {
    // The copy needs a slot; cached chunks we are about to pin can't be reclaimed for it.
    int64_t pinned = 0;
    for (TreeNode* n : m.path) pinned += n->live == 0;
    if (!tail_src && m.partial->live == 0) ++pinned;
    require_slots(1, "add_sequence", (step_ ? int64_t(step_->deferred_free.size()) : 0) - pinned);
    require_device_tails(1, "add_sequence");
    check_host_tier();
    check_host_copies(tail_src ? tail_src->tail.front() : m.partial->slot);
  }
  end_step("add_sequence");  // nothing below can fail

  auto s = std::make_unique<Sequence>();
  s->id = next_seq_id_;
  s->root = root ? root : tree_.root(ns);
  for (TreeNode* n : m.path) tree_.acquire(n);
  s->path = m.path;
  int64_t cached = k * C;
  if (partial_len > 0) {
    // Copy-on-diverge: the matched head of a chunk becomes our private tail.
    TreeNode* pin = tail_src ? nullptr : m.partial;
    if (pin) tree_.acquire(pin);  // so reclaiming can't take the source
    int32_t slot = take_slot();
    copy_chunk_all_layers(tail_src ? tail_src->tail.front() : m.partial->slot, slot, partial_len);
    if (pin) tree_.release(pin);
    s->tail.push_back(slot);
    cached += partial_len;
  }
  s->tokens.assign(tokens.begin(), tokens.begin() + cached);
  s->pending.assign(tokens.begin() + cached, tokens.end());
  reused_prompt_tokens_ += cached;
  int64_t id = next_seq_id_++;
  seqs_.emplace(id, std::move(s));
  return {id, cached};
}

int64_t KVCache::check_entries(const std::vector<PlanEntry>& entries) const {
  if (entries.empty()) throw ValueError("entries: expected at least one (seq, n_new) entry, got none");
  std::unordered_set<int64_t> seen;
  int64_t rows = 0, need = 0;
  const int C = cfg_.chunk_size;
  for (size_t i = 0; i < entries.size(); ++i) {
    const PlanEntry& e = entries[i];
    std::string arg = "entries[" + std::to_string(i) + "]";
    const Sequence& s = get_seq(e.seq, arg.c_str());
    if (!seen.insert(e.seq).second)
      throw ValueError(arg + ": sequence " + id_str(e.seq) + " appears twice in one step");
    int64_t n;
    if (!e.tokens.empty()) {
      if (s.pending_count() > 0)
        throw ValueError(arg + ": sequence " + id_str(e.seq) + " still has " +
                         std::to_string(s.pending_count()) +
                         " prompt tokens to plan; give a count (seq, n_new) for those first");
      n = int64_t(e.tokens.size());
    } else {
      n = e.count;
      if (n < 1 || n > s.pending_count())
        throw ValueError(arg + ": n_new for sequence " + id_str(e.seq) + ": expected 1.." +
                         std::to_string(s.pending_count()) + " (its pending prompt tokens" +
                         (s.pending_count() == 0 ? "; pass the new token ids instead" : "") +
                         "), got " + std::to_string(n));
    }
    rows += n;
    int64_t total = s.length() + n;
    need += (total + C - 1) / C - int64_t(s.path.size() + s.tail.size());
  }
  if (rows >= (int64_t(1) << 31)) throw ValueError("entries: too many tokens in one step");
  return need;
}

StepNeeds KVCache::needs(const std::vector<PlanEntry>& entries) {
  std::lock_guard<std::mutex> g(mu_);
  commit_if_complete();  // validation reads committed lengths
  const int64_t need = check_entries(entries);
  if (step_ && !step_->committed) end_step("plan");  // refuses: a layer is missing
  return step_needs(entries, need);
}

StepNeeds KVCache::request_needs(int64_t prompt_tokens, int64_t max_new_tokens, int n) const {
  if (prompt_tokens < 1)
    throw ValueError("prompt_tokens: expected an integer >= 1, got " + std::to_string(prompt_tokens));
  if (max_new_tokens < 1)
    throw ValueError("max_new_tokens: expected an integer >= 1, got " + std::to_string(max_new_tokens));
  if (n < 1) throw ValueError("n: expected an integer >= 1, got " + std::to_string(n));
  const int64_t C = cfg_.chunk_size;
  StepNeeds out;
  // The first decode step: the prompt's full chunks, and each sample's own partial or new chunk.
  out.pool_chunks = prompt_tokens / C + n;
  out.pool_available = pool_.capacity();
  const EvictionConfig& ev = cfg_.eviction;
  if (!ev.host_tier() || ev.dense_layers >= cfg_.layers) return out;
  // The longest sequence a step attends in full: the prompt (prefill), or a decode step's
  // context (prompt + generated tokens but the last) while within budget_tokens.
  const int64_t longest =
      ev.budget_tokens <= prompt_tokens ? prompt_tokens
                                        : prompt_tokens + std::min(max_new_tokens - 1, ev.budget_tokens - prompt_tokens);
  // Each other sample keeps its partial chunk on the device.
  out.device_chunks = (longest + C - 1) / C + n - 1;
  // fork: the parent's partial chunk, one copy per other sample, and the copy source.
  if (n > 1) out.device_chunks = std::max<int64_t>(out.device_chunks, int64_t(n) + 1);
  out.device_available = ev.device_chunks;
  return out;
}

uint64_t KVCache::plan(const std::vector<PlanEntry>& entries) {
  std::lock_guard<std::mutex> g(mu_);
  // Validate everything before touching state.
  commit_if_complete();  // validation reads committed lengths
  const int64_t need = check_entries(entries);
  const int C = cfg_.chunk_size;
  if (step_ && !step_->committed) end_step("plan");  // refuses: a layer is missing
  require_step(step_needs(entries, need), need);
  end_step("plan");

  auto st = std::make_unique<OpenStep>();
  st->id = g_next_step_id.fetch_add(1);
  st->appended.assign(size_t(cfg_.layers), 0);
  std::vector<PlanSeqInput> batch;
  batch.reserve(entries.size());
  std::vector<std::vector<int32_t>> slot_lists(entries.size());  // alive for the plan build
  bool grew = false;
  for (const PlanEntry& e : entries) {
    Sequence& s = *seqs_.at(e.seq);
    std::vector<int32_t> nt;
    bool prompt = e.tokens.empty();
    if (prompt)
      nt.assign(s.pending.begin() + long(s.pending_head), s.pending.begin() + long(s.pending_head + size_t(e.count)));
    else
      nt = e.tokens;
    int64_t total = s.length() + int64_t(nt.size());
    int32_t add = int32_t((total + C - 1) / C - int64_t(s.path.size() + s.tail.size()));
    for (int32_t k = 0; k < add; ++k) s.tail.push_back(take_slot());
    grew |= add > 0;
    st->seq_ids.push_back(e.seq);
    st->reserved.push_back(add);
    st->from_prompt.push_back(prompt);
    PlanSeqInput in;
    in.id = e.seq;
    in.n_new = int32_t(nt.size());
    in.ctx_before = s.length();
    in.n_shared = int32_t(s.path.size());
    auto& sl = slot_lists[batch.size()];  // tree nodes' slots, then the private ones
    for (TreeNode* n : s.path) sl.push_back(n->slot);
    sl.insert(sl.end(), s.tail.begin(), s.tail.end());
    in.slots = sl.data();
    in.n_chunks = int32_t(sl.size());
    batch.push_back(in);
    st->new_tokens.push_back(std::move(nt));
  }
  const PlanParams& pp = plan_params_;
  if (!grew && plan_tree_version_ == tree_.version() && bump_plan(plan_, batch, pp)) {
    ++plan_reuses_;
  } else {
    plan_step(plan_, batch, pp);
    plan_tree_version_ = tree_.version();
    ++plan_rebuilds_;
  }
  plan_.id = st->id;
  new_revision(plan_);
  if (cfg_.eviction.enabled)  // the chunks this step fills, once for every layer's append
    for (const StepSeq& q : plan_.seqs)
      for (int64_t c = q.ctx_before / C; (c + 1) * C <= q.total(); ++c)
        st->filled.push_back(plan_.seq_chunks[size_t(q.chunk_begin + c)]);
  step_ = std::move(st);
  return step_->id;
}

void KVCache::append(int layer, uint64_t step, const TensorView& k, const TensorView& v) {
  std::lock_guard<std::mutex> g(mu_);
  check_index("layer", layer, cfg_.layers, "a layer");
  const OpenStep& st = open_step(step, "step");
  if (st.appended[size_t(layer)])
    throw ValueError("layer: layer " + std::to_string(layer) + " was already appended in step " +
                     std::to_string(step));
  check_tensor3(k, "k", device_, cfg_.dtype, plan_.num_tokens, cfg_.kv_heads, cfg_.head_dim);
  check_tensor3(v, "v", device_, cfg_.dtype, plan_.num_tokens, cfg_.kv_heads, cfg_.head_dim);
  check_host_tier();
  if (cfg_.evicts_to_host(layer)) {
    backend_->append(layer, to_device_slots(layer, plan_, true), k, v);
    backup_filled(layer);  // digests, then the asynchronous copies to the host tier
  } else {
    backend_->append(layer, plan_, k, v);
    if (cfg_.eviction.enabled)  // chunks this step fills get their digests while their keys are hot
      backend_->update_digests(layer, step_->filled.data(), step_->filled.data(), step_->filled.size(),
                               cfg_.eviction.digest);
  }
  step_->appended[size_t(layer)] = 1;
  ++step_->layers_appended;
}

void KVCache::attention(int layer, uint64_t step, const TensorView& q, const TensorView& out,
                        const TensorView* lse) {
  std::lock_guard<std::mutex> g(mu_);
  check_index("layer", layer, cfg_.layers, "a layer");
  const OpenStep& st = open_step(step, "step");
  if (!st.appended[size_t(layer)])
    throw ValueError("layer: attention for layer " + std::to_string(layer) + " of step " +
                     std::to_string(step) + " needs append(layer, step, k, v) first");
  check_tensor3(q, "q", device_, cfg_.dtype, plan_.num_tokens, cfg_.q_heads, cfg_.head_dim);
  check_tensor3(out, "out", device_, cfg_.dtype, plan_.num_tokens, cfg_.q_heads, cfg_.head_dim);
  if (out.data == q.data && plan_.num_tokens > 0)
    throw ValueError("out: expected a buffer distinct from q, got the same memory");
  if (lse) {
    TensorView l3 = *lse;  // check as [rows, q_heads, 1]
    if (l3.ndim == 2) {
      l3.ndim = 3;
      l3.shape[2] = 1;
      l3.strides[2] = 1;
    } else {
      l3.ndim = -1;
    }
    try {
      check_tensor3(l3, "lse", device_, DType::Float32, plan_.num_tokens, cfg_.q_heads, 1);
    } catch (const ValueError&) {
      throw ValueError("lse: expected a C-contiguous float32 tensor of shape [" + std::to_string(plan_.num_tokens) +
                       ", " + std::to_string(cfg_.q_heads) + "]");
    }
  }
  check_host_tier();
  const StepPlan* plan = &plan_;
  if (cfg_.eviction.enabled && layer >= cfg_.eviction.dense_layers && select_chunks(layer, q))
    plan = &layer_plan_;
  // Recall what the selection needs, evicting what no sequence of the step selected.
  if (cfg_.evicts_to_host(layer)) plan = &to_device_slots(layer, *plan, false);
  backend_->attention(layer, *plan, q, out, lse);
  if (cfg_.evicts_to_host(layer)) demote_after_prefill(layer, q);
}

// The top-k candidates of every request of score_reqs_, by digest score (the backend
// scores and ranks: top_k.h's rule), into top_ (k per request, best first).
void KVCache::top_requests(int layer, const TensorView& q, int topk) {
  top_.resize(score_reqs_.size() * size_t(std::max(topk, 0)));
  for (size_t i = 0; i < score_reqs_.size(); ++i) score_reqs_[i].top = top_.data() + i * size_t(std::max(topk, 0));
  auto t0 = std::chrono::steady_clock::now();
  backend_->top_chunks(layer, q, score_reqs_.data(), score_reqs_.size(), cfg_.eviction.digest, topk);
  score_ns_ += ns_since(t0);
}

// Prefill attends to everything; afterwards an over-budget sequence keeps the chunks that
// score highest for its last prompt token: the others become the first eviction victims.
void KVCache::demote_after_prefill(int layer, const TensorView& q) {
  const EvictionConfig& ev = cfg_.eviction;
  const int topk = ev.resolved_topk(cfg_.chunk_size);
  score_reqs_.clear();
  for (size_t i = 0; i < plan_.seqs.size(); ++i) {
    const StepSeq& s = plan_.seqs[i];
    const int32_t nch = s.chunk_end - s.chunk_begin;
    int64_t lo, hi;  // prefill/extend rows whose sequence selects from its next decode step on
    if (decode_row(i) || !selects(ev, topk, true, s.total(), nch, lo, hi)) continue;
    Backend::ScoreRequest r;
    r.row = s.row_begin + s.n_new - 1;
    r.slots = plan_.seq_chunks.data() + s.chunk_begin + lo;  // full chunks: their digests exist
    r.n = size_t(hi - lo);
    score_reqs_.push_back(r);
  }
  if (score_reqs_.empty()) return;
  auto t0 = std::chrono::steady_clock::now();
  top_requests(layer, q, topk);
  for (const Backend::ScoreRequest& r : score_reqs_) {
    taken_.assign(r.n, 0);
    for (int j = 0; j < topk; ++j) taken_[size_t(r.top[j])] = 1;
    for (size_t c = 0; c < r.n; ++c) {
      if (taken_[c]) continue;
      const int32_t chunk = r.slots[c];
      if (res_->slot(layer, chunk) >= 0) res_->demote(layer, chunk);
    }
  }
  residency_ns_ += ns_since(t0);
}

// Budgeted attention: for each decoding sequence over budget, keep its sink chunks, its
// recent window and the top-k chunks by digest score for its query; build this layer's
// plan over the kept chunks (shared ones still attended once). False: nothing to drop.
bool KVCache::select_chunks(int layer, const TensorView& q) {
  const EvictionConfig& ev = cfg_.eviction;
  const int C = cfg_.chunk_size;
  const int topk = ev.resolved_topk(C);
  auto t0 = std::chrono::steady_clock::now();
  const size_t B = plan_.seqs.size();
  keep_.resize(B);
  // Which sequences select, and the candidate range [lo, hi) of each (sinks and window stay).
  score_reqs_.clear();
  cand_lo_.assign(B, -1);
  for (size_t i = 0; i < B; ++i) {
    const StepSeq& s = plan_.seqs[i];
    const int32_t nch = s.chunk_end - s.chunk_begin;
    keep_[i].assign(size_t(nch), 1);
    // Prefill and extend attend to everything; so does a sequence within budget.
    int64_t lo, hi;
    if (!selects(ev, topk, decode_row(i), s.total(), nch, lo, hi)) continue;
    cand_lo_[i] = int32_t(lo);
    Backend::ScoreRequest r;
    r.row = s.row_begin;
    r.slots = plan_.seq_chunks.data() + s.chunk_begin + lo;
    r.n = size_t(hi - lo);
    score_reqs_.push_back(r);
  }
  const bool any = !score_reqs_.empty();
  if (any) top_requests(layer, q, topk);
  for (size_t i = 0, k = 0; i < B; ++i) {
    if (cand_lo_[i] < 0) continue;
    const Backend::ScoreRequest& r = score_reqs_[k++];
    auto& keep = keep_[i];
    const int32_t lo = cand_lo_[i];
    for (size_t c = 0; c < r.n; ++c) keep[size_t(lo) + c] = 0;
    for (int32_t j = 0; j < topk; ++j) keep[size_t(lo + r.top[j])] = 1;
    scored_chunks_ += int64_t(r.n);
    dropped_chunks_ += int64_t(r.n) - topk;
  }
  if (any) {
    std::vector<PlanSeqInput>& in = layer_inputs_;
    in.resize(B);
    for (size_t i = 0; i < B; ++i) {
      const StepSeq& s = plan_.seqs[i];
      in[i].id = s.seq_id;
      in[i].n_new = s.n_new;
      in[i].ctx_before = s.ctx_before;
      in[i].slots = plan_.seq_chunks.data() + s.chunk_begin;
      in[i].n_chunks = s.chunk_end - s.chunk_begin;
      in[i].n_shared = s.n_shared;
      in[i].keep = keep_[i].data();
    }
    plan_step(layer_plan_, in, plan_params_);
    layer_plan_.id = plan_.id;
    new_revision(layer_plan_);
  }
  select_ns_ += ns_since(t0);
  return any;
}

void KVCache::cancel(uint64_t step) {
  std::lock_guard<std::mutex> g(mu_);
  const OpenStep& st = open_step(step, "step");
  commit_if_complete();
  if (st.committed)
    throw ValueError("step: step " + std::to_string(step) +
                     " was appended in every layer and is committed; it can no longer be cancelled");
  // Chunks this step filled hold uncommitted rows: their host copies must go, or a partial
  // chunk could be evicted and its later rows written into a fresh slot.
  if (res_)
    for (int32_t c : st.filled) drop_host_copies(c);
  for (size_t i = 0; i < st.seq_ids.size(); ++i) {
    Sequence& s = *seqs_.at(st.seq_ids[i]);
    for (int32_t k = 0; k < st.reserved[i]; ++k) {
      free_chunk(s.tail.back());
      s.tail.pop_back();
    }
  }
  step_.reset();
}

std::vector<int64_t> KVCache::fork(int64_t seq, int n) {
  std::lock_guard<std::mutex> g(mu_);
  Sequence& s = get_seq(seq, "seq");
  if (n < 1 || n > kMaxForkChildren)
    throw ValueError("n: expected an integer in 1.." + std::to_string(kMaxForkChildren) +
                     " (children per fork call), got " + std::to_string(n));
  commit_if_complete();
  if (step_ && !step_->committed) end_step("fork");  // refuses: a layer is missing
  const int C = cfg_.chunk_size;
  const int32_t tail_tokens = int32_t(s.length() - int64_t(s.path.size()) * C);
  require_slots(tail_tokens > 0 ? n : 0, "fork", step_ ? int64_t(step_->deferred_free.size()) : 0);
  require_device_tails(tail_tokens > 0 ? n : 0, "fork");
  check_host_tier();
  if (tail_tokens > 0) check_host_copies(s.tail.front());
  // All or nothing: every allocation (the children, their ids, room in seqs_) happens
  // before the cache changes; std::bad_alloc here leaves it as it was.
  std::unordered_map<int64_t, std::unique_ptr<Sequence>> children;
  children.reserve(size_t(n));
  std::vector<int64_t> ids;
  ids.reserve(size_t(n));
  for (int i = 0; i < n; ++i) {
    auto c = std::make_unique<Sequence>();
    c->id = next_seq_id_ + i;
    c->root = s.root;
    c->path = s.path;
    c->tail.reserve(1);
    c->tokens = s.tokens;
    c->pending.assign(s.pending.begin() + long(s.pending_head), s.pending.end());
    const int64_t id = c->id;
    ids.push_back(id);
    children.emplace(id, std::move(c));
  }
  seqs_.reserve(seqs_.size() + size_t(n));
  end_step("fork");  // nothing below can fail
  for (int64_t id : ids) {
    Sequence& c = *children.at(id);
    for (TreeNode* node : c.path) tree_.acquire(node);
    if (tail_tokens > 0) {
      int32_t slot = take_slot();  // cannot fail: require_slots counted it
      copy_chunk_all_layers(s.tail.front(), slot, tail_tokens);
      c.tail.push_back(slot);
    }
  }
  next_seq_id_ += n;
  seqs_.merge(children);  // moves the nodes: no allocation (room reserved above)
  return ids;
}

void KVCache::remove(int64_t seq) {
  std::lock_guard<std::mutex> g(mu_);
  Sequence& s = get_seq(seq, "seq");
  end_step("remove");
  release_sequence(s);
  seqs_.erase(seq);
}

void KVCache::clear() {
  std::lock_guard<std::mutex> g(mu_);
  end_step("clear");
  for (int32_t slot : tree_.reclaim_all()) free_chunk(slot);
}

int64_t KVCache::sequence_length(int64_t seq) {
  std::lock_guard<std::mutex> g(mu_);
  commit_if_complete();
  return get_seq(seq, "seq").length();
}

std::vector<int32_t> KVCache::sequence_slots(int64_t seq) {
  std::lock_guard<std::mutex> g(mu_);
  commit_if_complete();
  const Sequence& s = get_seq(seq, "seq");
  std::vector<int32_t> out;
  for (TreeNode* n : s.path) out.push_back(n->slot);
  out.insert(out.end(), s.tail.begin(), s.tail.end());
  return out;
}

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
  st.sequences = int64_t(seqs_.size());
  const int C = cfg_.chunk_size;
  int64_t unshared_chunks = 0;
  for (const auto& kv : seqs_) {
    const Sequence& s = *kv.second;
    st.tokens_cached += s.length();
    unshared_chunks += int64_t(s.path.size() + s.tail.size());
  }
  // What the live sequences would hold without sharing, minus what they do hold.
  int64_t held = pool_.in_use() - tree_.cached_nodes();
  st.tokens_saved_by_sharing = std::max<int64_t>(0, unshared_chunks - held) * C;
  st.reused_prompt_tokens = reused_prompt_tokens_;
  st.bytes_per_chunk = cfg_.bytes_per_chunk();
  st.plan_rebuilds = plan_rebuilds_;
  st.plan_reuses = plan_reuses_;
  st.evict_scored_chunks = scored_chunks_;
  st.evict_dropped_chunks = dropped_chunks_;
  st.evict_select_ns = select_ns_;
  st.evict_score_ns = score_ns_;
  if (res_) {
    st.evict_device_chunks = cfg_.eviction.device_chunks;
    st.evict_device_slots_in_use = res_->slots_in_use();
    st.evict_backups = backups_;
    st.evict_recalls = recalls_;
    st.evict_evictions = evictions_;
    st.evict_backup_waits = backup_waits_;
    st.evict_bytes_to_host = bytes_to_host_;
    st.evict_bytes_from_host = bytes_from_host_;
    st.evict_host_bytes_in_use = host_->ram_bytes_in_use();
    st.evict_spill_bytes_in_use = host_->spill_bytes_in_use();
    st.evict_residency_ns = residency_ns_;
  }
  st.chunk_first_units = plan_.chunk_first_units;
  st.chunk_first_chunks = plan_.chunk_first_chunks;
  return st;
}

StepInfo KVCache::step_info(uint64_t step) const {
  std::lock_guard<std::mutex> g(mu_);
  open_step(step, "step");
  StepInfo info;
  info.num_tokens = plan_.num_tokens;
  for (const StepSeq& s : plan_.seqs) {
    info.seq_ids.push_back(s.seq_id);
    info.row_offsets.push_back(s.row_begin);
  }
  info.row_offsets.push_back(plan_.num_tokens);
  info.positions = plan_.positions;
  return info;
}

const StepPlan& KVCache::step_plan(uint64_t step) const {
  std::lock_guard<std::mutex> g(mu_);
  open_step(step, "step");
  return plan_;
}

void KVCache::read_digest(int layer, int32_t slot, int head, float* dst) const {
  std::lock_guard<std::mutex> g(mu_);
  check_index("layer", layer, cfg_.layers, "a layer");
  check_index("slot", slot, pool_.capacity(), "a chunk id");
  check_index("head", head, cfg_.kv_heads, "a KV head");
  if (!cfg_.eviction.enabled)
    throw ValueError("read_digest: expected a cache with eviction (digests are kept for budgeted attention "
                     "only), got one without");
  backend_->read_digest(layer, slot, head, dst);
}

void KVCache::read_tile(int layer, int32_t slot, int kv, int head, float* dst) const {
  std::lock_guard<std::mutex> g(mu_);
  check_index("layer", layer, cfg_.layers, "a layer");
  check_index("slot", slot, pool_.capacity(), "a chunk id");
  check_index("kv", kv, 2, "0 (K) or 1 (V), i.e.");
  check_index("head", head, cfg_.kv_heads, "a KV head");
  if (!dst) throw ValueError("dst: expected a buffer, got a null pointer");
  if (!cfg_.evicts_to_host(layer)) {
    backend_->read_tile(layer, slot, kv, head, dst);
    return;
  }
  const int32_t dev = res_->slot(layer, slot);
  if (dev >= 0) {
    backend_->read_tile(layer, dev, kv, head, dst);
    return;
  }
  const int64_t b = res_->host_block(layer, slot);
  if (b < 0)
    throw ValueError("read_tile: chunk " + std::to_string(slot) + " holds no data in layer " + std::to_string(layer));
  KVCache* self = const_cast<KVCache*>(this);  // waiting and settling change bookkeeping only
  self->wait_backup(res_->ticket(layer, slot));
  host_->settle(backend_->backups_done());
  const size_t tile = size_t(cfg_.chunk_size) * cfg_.head_dim;
  const uint8_t* p = static_cast<const uint8_t*>(host_->read(b, host_scratch_));
  tile_to_float(p + (size_t(kv) * cfg_.kv_heads + size_t(head)) * tile * dtype_size(cfg_.dtype), cfg_.dtype, tile, dst);
}

std::string KVCache::chunk_residency(int layer, int32_t slot) const {
  std::lock_guard<std::mutex> g(mu_);
  check_index("layer", layer, cfg_.layers, "a layer");
  check_index("slot", slot, pool_.capacity(), "a chunk id");
  if (!cfg_.evicts_to_host(layer)) return "device";
  const bool dev = res_->slot(layer, slot) >= 0, host = res_->host_block(layer, slot) >= 0;
  return dev && host ? "device+host" : dev ? "device" : host ? "host" : "none";
}

}  // namespace chunkvale
