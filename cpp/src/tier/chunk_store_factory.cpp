#include "chunk_store_factory.h"

#include "tiered_store.h"

namespace chunkvale {

std::unique_ptr<ChunkStore> make_chunk_store(const CacheConfig& cfg, Backend& backend, ChunkPool& pool,
                                             PrefixTree& tree, ChunkSelector& selector) {
  if (cfg.eviction.host_tier()) return std::make_unique<TieredStore>(cfg, backend, pool, tree, selector);
  return std::make_unique<ChunkStore>(cfg, backend, pool, tree);
}

}  // namespace chunkvale
