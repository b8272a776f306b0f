// One planned step as the core keeps it (the caller holds its chunkvale::Step): what plan()
// decided (the entries, the chunks it added, its StepPlan) and how far it got (layers
// appended). It commits its tokens into the sequences once every layer was appended, or is
// cancelled, giving back the chunks it added.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "chunkvale/cache_stats.h"
#include "chunkvale/config.h"
#include "chunkvale/step_plan.h"
#include "chunkvale/step_request.h"
#include "sequence_table.h"

namespace chunkvale {

class PrefixTree;

// A fresh revision for a plan whose content changed (a backend keeping a device copy
// re-uploads on a new one). Unique across caches.
void new_revision(StepPlan& p);

struct StepEntry {
  int64_t seq = 0;
  std::vector<int32_t> new_tokens;
  bool from_prompt = false;
  int32_t reserved = 0;  // chunks added to the sequence's tail by this step
};

class PlannedStep {
 public:
  uint64_t id = 0;
  StepPlan plan;                      // every layer's (selection derives per-layer ones from it)
  std::vector<StepEntry> entries;     // one per plan.seqs
  std::vector<uint8_t> appended;      // per layer
  int layers_appended = 0;
  bool committed = false;             // tokens are cached; attention still allowed
  std::vector<int32_t> deferred_free; // deduplicated chunks, freed when the step ends
  std::vector<int32_t> filled;        // chunks this step fills (digests; eviction only)

  // Entry i decodes (SelectionRule::decodes).
  bool decodes(size_t i) const;
  // Commits the tokens into their sequences and seals their full chunks.
  void commit(SequenceTable& seqs);
  // Takes the chunks this step added off the sequences' tails, into `freed`.
  void cancel(SequenceTable& seqs, std::vector<int32_t>& freed) const;
};

// Builds steps: grows the sequences' tails, then the plan, reusing the previous step's
// plan when only lengths moved (bump_plan).
class StepPlanner {
 public:
  explicit StepPlanner(const CacheConfig& cfg);
  const PlanParams& params() const { return params_; }

  // `take_chunk` cannot fail (admission counted the chunks); `entries` were validated.
  std::unique_ptr<PlannedStep> build(const std::vector<PlanEntry>& entries, SequenceTable& seqs, const PrefixTree& tree,
                              const std::function<int32_t()>& take_chunk);
  // A step that ended hands its plan back for reuse by the next one.
  void recycle(PlannedStep& step) { std::swap(last_, step.plan); }
  const CacheStats& counts() const { return counts_; }  // part_counts.h

 private:
  int C_, layers_;
  bool eviction_;
  PlanParams params_;
  StepPlan last_;
  uint64_t tree_version_ = ~0ull;  // the tree `last_` was built against
  CacheStats counts_;  // plan rebuilds and reuses, the latest plan's chunk-first work
};

}  // namespace chunkvale
