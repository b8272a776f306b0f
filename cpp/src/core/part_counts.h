// How CacheStats is assembled: each part counts straight into its own CacheStats (only the
// fields it owns move), and KVCache::stats() adds the parts up with add_counts. No field is
// copied by hand from a loose counter.
#pragma once
#include "chunkvale/cache_stats.h"

namespace chunkvale {

inline void add_counts(CacheStats& into, const CacheStats& part) {
#define CHUNKVALE_ADD_COUNT(name) into.name += part.name;
#define CHUNKVALE_ADD_TIME(name) into.name##_ns += part.name##_ns;
  CHUNKVALE_CACHE_STATS_COUNTS(CHUNKVALE_ADD_COUNT)
  CHUNKVALE_CACHE_STATS_TIMES(CHUNKVALE_ADD_TIME)
#undef CHUNKVALE_ADD_COUNT
#undef CHUNKVALE_ADD_TIME
}

}  // namespace chunkvale
