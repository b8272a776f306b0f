#include "admission.h"

#include <algorithm>
#include <limits>
#include <string>
#include <unordered_set>

#include "chunkvale/errors.h"
#include "selection_rule.h"

namespace chunkvale {

int64_t check_entries(const SequenceTable& seqs, const std::vector<PlanEntry>& entries, int C) {
  if (entries.empty()) throw ValueError("entries: expected at least one (seq, n_new) entry, got none");
  std::unordered_set<int64_t> seen;
  int64_t rows = 0, need = 0;
  for (size_t i = 0; i < entries.size(); ++i) {
    const PlanEntry& e = entries[i];
    const std::string arg = "entries[" + std::to_string(i) + "]";
    const Sequence& s = seqs.get(e.seq, arg.c_str());
    const std::string id = std::to_string(e.seq);
    if (!seen.insert(e.seq).second) throw ValueError(arg + ": sequence " + id + " appears twice in one step");
    int64_t n;
    if (!e.tokens.empty()) {
      if (s.pending_count() > 0)
        throw ValueError(arg + ": sequence " + id + " still has " + std::to_string(s.pending_count()) +
                         " prompt tokens to plan; give a count (seq, n_new) for those first");
      n = int64_t(e.tokens.size());
    } else {
      n = e.count;
      if (n < 1 || n > s.pending_count())
        throw ValueError(arg + ": n_new for sequence " + id + ": expected 1.." + std::to_string(s.pending_count()) +
                         " (its pending prompt tokens" +
                         (s.pending_count() == 0 ? "; pass the new token ids instead" : "") + "), got " +
                         std::to_string(n));
    }
    rows += n;
    need += (s.length() + n + C - 1) / C - s.chunks();
  }
  if (rows >= (int64_t(1) << 31)) throw ValueError("entries: too many tokens in one step");
  return need;
}

namespace {
int64_t pool_available(const AdmissionView& v) { return v.pool_free + v.cached_chunks + v.freed_later; }
}  // namespace

StepNeeds step_needs(const AdmissionView& v, const std::vector<PlanEntry>& entries, int64_t new_chunks) {
  StepNeeds out;
  out.pool_chunks = new_chunks;
  out.pool_available = pool_available(v);
  if (!v.evicts()) return out;
  const CacheConfig& cfg = *v.cfg;
  const int C = cfg.chunk_size;
  const SelectionRule rule(cfg.eviction, C);
  const int64_t E = cfg.layers - v.evict_from;
  // Device: what one evicting layer holds at once in this step. A decoding sequence over
  // budget keeps sinks + window + top-k (the selection rule); every other one attends all.
  std::unordered_set<int32_t> must;
  std::unordered_set<int64_t> in_step;
  int64_t fresh = 0, filled = 0;
  for (const PlanEntry& e : entries) {
    const Sequence& s = *v.seqs->all().at(e.seq);
    in_step.insert(e.seq);
    const int64_t n = e.tokens.empty() ? e.count : int64_t(e.tokens.size());
    const int64_t total = s.length() + n;
    const int64_t nch = (total + C - 1) / C;
    filled += total / C - s.length() / C;
    const SelectionRule::Range r = rule.of(SelectionRule::decodes(n, e.tokens.empty()), total, nch);
    for (int64_t i = 0; i < nch; ++i) {
      if (r.selects && i >= r.lo && i < r.hi) continue;
      if (i >= s.chunks())
        ++fresh;
      else
        must.insert(s.chunk(size_t(i)));
    }
    if (r.selects) fresh += rule.topk;
  }
  for (const auto& kv : v.seqs->all())  // partial chunks of the others stay too
    if (!in_step.count(kv.first) && kv.second->length() % C != 0) ++fresh;
  out.device_chunks = int64_t(must.size()) + fresh;
  out.device_available = cfg.eviction.device_chunks;
  // Host: one block per chunk this step fills, per evicting layer; reclaimable cached
  // prefix the pool does not take for this step gives its blocks back.
  out.host_blocks = filled * E;
  out.host_available = v.host_free;
  if (v.host_free != std::numeric_limits<int64_t>::max())
    out.host_available += E * std::max<int64_t>(0, v.cached_chunks - std::max<int64_t>(0, new_chunks - v.pool_free -
                                                                                            v.freed_later));
  return out;
}

StepNeeds tail_needs(const AdmissionView& v, int64_t n, int64_t new_tails) {
  StepNeeds out;
  out.pool_chunks = n;
  out.pool_available = pool_available(v);
  if (!v.evicts() || new_tails == 0) return out;
  out.device_chunks = v.seqs->open_tails() + new_tails + 1;  // +1: the copy's source
  out.device_available = v.cfg->eviction.device_chunks;
  return out;
}

void require(const AdmissionView& v, const StepNeeds& n, Resource r, const char* what, bool tails) {
  const std::string w(what);
  switch (r) {
    case Resource::PoolChunks:
      if (n.pool_chunks <= n.pool_available) return;
      throw CapacityError(r, n.pool_chunks, n.pool_available,
                          w + ": needs " + std::to_string(n.pool_chunks) + " free chunks, but only " +
                              std::to_string(n.pool_available) + " of " + std::to_string(v.pool_capacity) +
                              " can be had (" + std::to_string(v.pool_free) + " free, " +
                              std::to_string(v.cached_chunks) +
                              " reclaimable cached prefix); every other chunk is held by a live sequence. "
                              "Remove sequences or raise capacity_chunks.");
    case Resource::DeviceChunks:
      if (n.device_chunks <= n.device_available) return;
      if (tails)
        throw CapacityError(r, n.device_chunks, n.device_available,
                            w + ": needs " + std::to_string(n.device_chunks) +
                                " device chunks per evicting layer (every live sequence's partial chunk stays on "
                                "the device, plus the copy), but eviction.device_chunks=" +
                                std::to_string(n.device_available) +
                                ". Remove sequences or raise eviction.device_chunks.");
      throw CapacityError(r, n.device_chunks, n.device_available,
                          w + ": this step needs up to " + std::to_string(n.device_chunks) +
                              " chunks on the device in each evicting layer (every chunk of sequences that "
                              "prefill or are within budget, sinks + window + top-k of the others, every live "
                              "sequence's partial chunk), but eviction.device_chunks=" +
                              std::to_string(n.device_available) +
                              ". Plan fewer tokens or sequences per step, or raise eviction.device_chunks.");
    case Resource::HostBlocks:
      if (n.host_blocks <= n.host_available) return;
      throw CapacityError(r, n.host_blocks, n.host_available,
                          w + ": the host tier needs " + std::to_string(n.host_blocks) + " more blocks of " +
                              std::to_string(v.cfg->layer_chunk_bytes()) +
                              " bytes (K/V of one chunk in one layer) for the chunks this step fills, but "
                              "eviction.host_bytes=" + std::to_string(v.cfg->eviction.host_bytes) +
                              " has room for " + std::to_string(v.host_free) + " (and " +
                              std::to_string(n.host_available - v.host_free) +
                              " from reclaimable cached prefix). Set eviction.spill_path, raise "
                              "eviction.host_bytes, or remove sequences.");
  }
}

}  // namespace chunkvale
