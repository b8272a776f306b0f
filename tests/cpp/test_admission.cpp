// Admission alone: the capacity rules as pure functions of the table, the pool and the
// host tier's room; and the selection rule they share with chunk selection.
#include <limits>
#include <vector>

#include "admission.h"
#include "check.h"
#include "selection_rule.h"

using namespace chunkvale;

namespace {
constexpr int C = 16;

CacheConfig host_tier() {
  CacheConfig c;
  c.layers = 4, c.q_heads = 2, c.kv_heads = 1, c.head_dim = 64, c.chunk_size = C, c.capacity_chunks = 64;
  c.eviction.enabled = true;
  c.eviction.budget_tokens = 4 * C;
  c.eviction.sink_chunks = 1, c.eviction.window_chunks = 1, c.eviction.topk_chunks = 1;
  c.eviction.dense_layers = 1;
  c.eviction.device_chunks = 8;
  return c;
}

void selection_rule() {
  const SelectionRule r(host_tier().eviction, C);
  CHECK(r.topk == 1 && SelectionRule::decodes(1, false) && !SelectionRule::decodes(1, true) &&
        !SelectionRule::decodes(2, false));
  SelectionRule::Range x = r.of(true, 100, 7);  // over budget: candidates 1..5
  CHECK(x.selects && x.lo == 1 && x.hi == 6);
  CHECK(!r.of(false, 100, 7).selects);  // prefill attends to everything
  CHECK(!r.of(true, 64, 4).selects);    // within budget
  x = r.of(true, 65, 3);                // over budget, but only one candidate (= top-k)
  CHECK(!x.selects && x.lo == 1 && x.hi == 2);
}

struct Table {
  PrefixTree tree{C};
  SequenceTable seqs{tree, C};
  // A sequence of n committed tokens in private chunks numbered from `first`.
  int64_t add(int n, int32_t first) {
    std::vector<int32_t> toks(static_cast<size_t>(n), 5);
    const int64_t id = seqs.add(tree.root(""), {}, [] { return -1; }, toks, n);
    for (int i = 0; i * C < n; ++i) seqs.get(id, "s").tail.push_back(first + i);
    return id;
  }
};

void entries_and_pool() {
  Table t;
  const int64_t a = t.add(20, 0);
  CHECK(check_entries(t.seqs, {PlanEntry{a, 0, std::vector<int32_t>(13, 1)}}, C) == 1);  // 33 tokens: 3 chunks
  CHECK_THROWS(check_entries(t.seqs, {PlanEntry{a, 1, {}}}, C), ValueError, "n_new for sequence 1: expected 1..0");
  CHECK_THROWS(check_entries(t.seqs, {PlanEntry{7, 1, {}}}, C), KeyError, "entries[0]");
  const CacheConfig cfg = host_tier();
  AdmissionView v;
  v.cfg = &cfg;
  v.seqs = &t.seqs;
  v.pool_free = 2, v.pool_capacity = 64, v.cached_chunks = 3, v.freed_later = 1;
  v.evict_from = cfg.layers;  // no evicting layer: device and host are 0/0
  StepNeeds n = step_needs(v, {PlanEntry{a, 0, {1}}}, 6);
  CHECK(n.pool_chunks == 6 && n.pool_available == 6 && n.fits() && n.device_chunks == 0 && n.host_available == 0);
  n.pool_chunks = 7;
  try {
    require(v, n, Resource::PoolChunks, "plan");
    CHECK(false);
  } catch (const CapacityError& e) {
    CHECK(e.resource == Resource::PoolChunks && e.needed == 7 && e.available == 6);
    CHECK(std::string(e.what()).find("plan: needs 7 free chunks, but only 6 of 64 can be had (2 free, 3 "
                                     "reclaimable cached prefix)") == 0);
  }
  require(v, n, Resource::DeviceChunks, "plan");  // 0 <= 0: nothing to refuse
}

void device_and_host() {
  Table t;
  const CacheConfig cfg = host_tier();
  const int64_t a = t.add(100, 0);   // 7 chunks, over budget
  const int64_t b = t.add(20, 10);   // 2 chunks, within budget, not in the step: its partial chunk stays
  AdmissionView v;
  v.cfg = &cfg;
  v.seqs = &t.seqs;
  v.pool_free = 10, v.pool_capacity = 64, v.cached_chunks = 2;
  v.evict_from = 1;
  v.host_free = 5;
  // a decodes: sink (chunk 0) + window (chunk 6) + top-1, plus b's partial chunk.
  StepNeeds n = step_needs(v, {PlanEntry{a, 0, {1}}}, 0);
  CHECK(n.device_chunks == 4 && n.device_available == 8);
  CHECK(n.host_blocks == 0 && n.host_available == 5 + 3 * 2);  // 3 evicting layers x 2 cached chunks
  // a extends by 30 tokens (no selection): every chunk (8) + b's partial chunk; fills 2 chunks.
  n = step_needs(v, {PlanEntry{a, 0, std::vector<int32_t>(30, 1)}}, 1);
  CHECK(n.device_chunks == 10 && !n.fits() && n.host_blocks == 2 * 3);
  CHECK_THROWS(require(v, n, Resource::DeviceChunks, "plan"), CapacityError, "eviction.device_chunks=8");
  v.host_free = std::numeric_limits<int64_t>::max();  // a spill file: unbounded
  CHECK(step_needs(v, {PlanEntry{b, 0, {1}}}, 0).host_available == std::numeric_limits<int64_t>::max());
  // Tails: every open partial chunk (a's, b's), the new ones, and the copy source.
  n = tail_needs(v, 3, 3);
  CHECK(n.pool_chunks == 3 && n.device_chunks == 2 + 3 + 1 && n.fits());
  CHECK(tail_needs(v, 0, 0).device_chunks == 0);
  n.device_chunks = 9;
  CHECK_THROWS(require(v, n, Resource::DeviceChunks, "fork", true), CapacityError,
               "fork: needs 9 device chunks per evicting layer");
}
}  // namespace

int main() {
  selection_rule();
  entries_and_pool();
  device_and_host();
  return finish("admission");
}
