// Admission: will a step fit? The one place for the capacity rules. Pure functions of what
// the cache holds now (the sequence table, the pool, the host tier's room) and the entries;
// plan(), needs() and the Engine (through request_needs) all ask here.
#pragma once
#include <cstdint>
#include <vector>

#include "chunkvale/config.h"
#include "chunkvale/errors.h"
#include "chunkvale/step_request.h"
#include "sequence_table.h"

namespace chunkvale {

// What admission reads of the cache.
struct AdmissionView {
  const CacheConfig* cfg = nullptr;
  const SequenceTable* seqs = nullptr;
  int64_t pool_free = 0, pool_capacity = 0;
  int64_t cached_chunks = 0;  // unreferenced prefix: reclaimable
  int64_t freed_later = 0;    // chunks freed when the open step ends
  int evict_from = 0;         // first layer that evicts to the host tier (cfg->layers: none)
  int64_t host_free = 0;      // blocks the host tier can still hand out (INT64_MAX: unbounded)
  bool evicts() const { return evict_from < cfg->layers; }
};

// Validates plan()'s entries (ValueError / KeyError naming entries[i]); returns the pool
// chunks the step adds.
int64_t check_entries(const SequenceTable& seqs, const std::vector<PlanEntry>& entries, int chunk_size);

// What the step `entries` needs of each resource, against what it can have.
StepNeeds step_needs(const AdmissionView& v, const std::vector<PlanEntry>& entries, int64_t new_chunks);

// Throws `what`'s CapacityError for resource `r` when `n` lacks it (messages name the
// config field to raise). `tails`: n came from tail_needs.
void require(const AdmissionView& v, const StepNeeds& n, Resource r, const char* what, bool tails = false);

// Pool chunks for `n` new chunks; device chunks for `new_tails` new partial chunks (a copy
// into a fresh tail: add_sequence's copy-on-diverge and fork): partial chunks have no host
// copy, so they never leave the device.
StepNeeds tail_needs(const AdmissionView& v, int64_t n, int64_t new_tails);

// KVCache::request_needs (request_needs.cpp): one request alone in an empty cache, in the order
// the Engine's scheduler runs it.
StepNeeds request_needs(const CacheConfig& cfg, int64_t capacity, int64_t prompt_tokens, int64_t max_new_tokens,
                        int n);

}  // namespace chunkvale
