// Picks the backend for a configured device. The only place that knows which backends
// were built; everything else talks to Backend.
#pragma once
#include <memory>

#include "chunkvale/backend.h"

namespace chunkvale {

std::unique_ptr<Backend> make_backend(const CacheConfig& cfg, int64_t slots);
bool cuda_backend_built();
// Throws ValueError naming the config field unless `backend` has every ability `cfg` needs
// (Digests for eviction, a CopyEngine for the host tier). The cache asks once, when made.
void require_abilities(const CacheConfig& cfg, Backend& backend);

}  // namespace chunkvale
