#include "backend_factory.h"

#include "chunkvale/errors.h"
#include "cpu_backend.h"

#include <string>

#ifdef CHUNKVALE_WITH_CUDA
namespace chunkvale {
// Defined in cuda/ (built only with CUDA).
std::unique_ptr<Backend> make_cuda_backend(const CacheConfig& cfg, int64_t slots);
}  // namespace chunkvale
#endif

namespace chunkvale {

bool cuda_backend_built() {
#ifdef CHUNKVALE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

void require_abilities(const CacheConfig& cfg, Backend& backend) {
  if (cfg.eviction.enabled && !backend.digests())
    throw ValueError(std::string("eviction: chunk digests are not implemented on the ") + backend.name() +
                     " backend; construct the cache without eviction");
  if (cfg.eviction.host_tier() && !backend.copy_engine())
    throw ValueError(std::string("eviction.device_chunks: the host tier is not implemented on the ") + backend.name() +
                     " backend; leave device_chunks unset");
}

std::unique_ptr<Backend> make_backend(const CacheConfig& cfg, int64_t slots) {
  if (cfg.device == "cpu") return std::make_unique<CpuBackend>(cfg, slots);
#ifdef CHUNKVALE_WITH_CUDA
  if (cfg.device == "cuda") return make_cuda_backend(cfg, slots);
#endif
  throw ValueError("device: '" + cfg.device + "' needs the CUDA backend, which this build of chunkvale does not contain");
}

}  // namespace chunkvale
