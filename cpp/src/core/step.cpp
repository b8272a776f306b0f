#include "step.h"

#include <algorithm>
#include <atomic>
#include <thread>

#include "plan_builder.h"
#include "selection_rule.h"

namespace chunkvale {

namespace {
// Step ids are unique across caches, so a step can't be passed to the wrong cache.
std::atomic<uint64_t> g_next_step_id{1};
std::atomic<uint64_t> g_next_plan_revision{1};
}  // namespace

void new_revision(StepPlan& p) { p.revision = g_next_plan_revision++; }

bool PlannedStep::decodes(size_t i) const { return SelectionRule::decodes(plan.seqs[i].n_new, entries[i].from_prompt); }

void PlannedStep::commit(SequenceTable& seqs) {
  for (const StepEntry& e : entries) {
    Sequence& s = seqs.get(e.seq, "step");
    s.tokens.insert(s.tokens.end(), e.new_tokens.begin(), e.new_tokens.end());
    if (e.from_prompt) {
      s.pending_head += e.new_tokens.size();
      if (s.pending_head == s.pending.size()) {
        s.pending.clear();
        s.pending_head = 0;
      }
    }
    seqs.seal_full_chunks(s, deferred_free);
  }
  committed = true;
}

void PlannedStep::cancel(SequenceTable& seqs, std::vector<int32_t>& freed) const {
  for (const StepEntry& e : entries) {
    Sequence& s = seqs.get(e.seq, "step");
    for (int32_t k = 0; k < e.reserved; ++k) {
      freed.push_back(s.tail.back());
      s.tail.pop_back();
    }
  }
}

StepPlanner::StepPlanner(const CacheConfig& cfg) : C_(cfg.chunk_size), layers_(cfg.layers), eviction_(cfg.eviction.enabled) {
  params_.chunk_size = cfg.chunk_size;
  params_.share_threshold = cfg.share_threshold;
}

std::unique_ptr<PlannedStep> StepPlanner::build(const std::vector<PlanEntry>& entries, SequenceTable& seqs,
                                         const PrefixTree& tree, const std::function<int32_t()>& take_chunk) {
  auto st = std::make_unique<PlannedStep>();
  st->id = g_next_step_id.fetch_add(1);
  st->appended.assign(size_t(layers_), 0);
  std::vector<PlanSeqInput> batch;
  batch.reserve(entries.size());
  std::vector<std::vector<int32_t>> slot_lists(entries.size());  // alive for the plan build
  bool grew = false;
  for (const PlanEntry& e : entries) {
    Sequence& s = seqs.get(e.seq, "entries");
    StepEntry se;
    se.seq = e.seq;
    se.from_prompt = e.tokens.empty();
    if (se.from_prompt)
      se.new_tokens.assign(s.pending.begin() + long(s.pending_head),
                           s.pending.begin() + long(s.pending_head + size_t(e.count)));
    else
      se.new_tokens = e.tokens;
    const int64_t total = s.length() + int64_t(se.new_tokens.size());
    se.reserved = int32_t((total + C_ - 1) / C_ - s.chunks());
    for (int32_t k = 0; k < se.reserved; ++k) s.tail.push_back(take_chunk());
    grew |= se.reserved > 0;
    PlanSeqInput in;
    in.id = e.seq;
    in.n_new = int32_t(se.new_tokens.size());
    in.ctx_before = s.length();
    in.n_shared = int32_t(s.path.size());
    auto& sl = slot_lists[batch.size()];  // tree nodes' chunks, then the private ones
    sl = seqs.chunks_of(s);
    in.slots = sl.data();
    in.n_chunks = int32_t(sl.size());
    batch.push_back(in);
    st->entries.push_back(std::move(se));
  }
  std::swap(st->plan, last_);
  StepPlan& plan = st->plan;
  if (!grew && tree_version_ == tree.version() && bump_plan(plan, batch, params_)) {
    ++counts_.plan_reuses;
  } else {
    plan_step(plan, batch, params_);
    tree_version_ = tree.version();
    ++counts_.plan_rebuilds;
  }
  plan.id = st->id;
  new_revision(plan);
  counts_.chunk_first_units = plan.chunk_first_units;  // the latest plan's
  counts_.chunk_first_chunks = plan.chunk_first_chunks;
  if (eviction_)  // the chunks this step fills, once for every layer's append
    for (const StepSeq& q : plan.seqs)
      for (int64_t c = q.ctx_before / C_; (c + 1) * C_ <= q.total(); ++c)
        st->filled.push_back(plan.seq_chunks[size_t(q.chunk_begin + c)]);
  return st;
}

}  // namespace chunkvale
