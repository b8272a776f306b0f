// Picks the chunk store for a config: the host tier (TieredStore) when eviction has
// device_chunks, else every chunk on the device (ChunkStore). Its own file, so that the base
// store never includes the store derived from it.
#pragma once
#include <memory>

#include "chunk_selection.h"
#include "chunk_store.h"

namespace chunkvale {

std::unique_ptr<ChunkStore> make_chunk_store(const CacheConfig& cfg, Backend& backend, ChunkPool& pool,
                                             PrefixTree& tree, ChunkSelector& selector);

}  // namespace chunkvale
