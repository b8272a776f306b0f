// What a cache reports of itself (KVCache::stats). The field list is written once, here:
// the struct, the Python type and its mapping view are all made from it.
#pragma once
#include <cstdint>

namespace chunkvale {

// X(name): one int64 field each, in the order Python lists them. Times are nanoseconds
// (Python shows them as *_seconds).
#define CHUNKVALE_CACHE_STATS_COUNTS(X)                                                          \
  X(capacity_chunks) X(chunks_in_use) X(chunks_free) X(chunks_shared) X(chunks_cached)          \
  X(peak_chunks) X(sequences) X(tokens_cached) X(tokens_saved_by_sharing)                       \
  X(reused_prompt_tokens) X(bytes_per_chunk) X(plan_rebuilds) X(plan_reuses)                    \
  X(chunk_first_units) X(chunk_first_chunks)                                                    \
  /* budgeted attention: chunks scored, chunks left out */                                      \
  X(evict_scored_chunks) X(evict_dropped_chunks)                                                \
  /* host tier (zero without it): chunk moves and bytes per (layer, chunk), waits for a */      \
  /* backup before a slot was reused, what the tiers hold now */                                \
  X(evict_device_chunks) X(evict_device_slots_in_use) X(evict_backups) X(evict_recalls)         \
  X(evict_evictions) X(evict_backup_waits) X(evict_bytes_to_host) X(evict_bytes_from_host)      \
  X(evict_host_bytes_in_use) X(evict_spill_bytes_in_use)
// Time spent selecting chunks, in the backend's scoring calls (results back on the host
// included), and on residency.
#define CHUNKVALE_CACHE_STATS_TIMES(X) X(evict_select) X(evict_score) X(evict_residency)

struct CacheStats {
#define CHUNKVALE_COUNT_FIELD(name) int64_t name = 0;
#define CHUNKVALE_TIME_FIELD(name) int64_t name##_ns = 0;
  CHUNKVALE_CACHE_STATS_COUNTS(CHUNKVALE_COUNT_FIELD)
  CHUNKVALE_CACHE_STATS_TIMES(CHUNKVALE_TIME_FIELD)
#undef CHUNKVALE_COUNT_FIELD
#undef CHUNKVALE_TIME_FIELD
};

}  // namespace chunkvale
