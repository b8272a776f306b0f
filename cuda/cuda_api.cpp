// Plain C++ (no CUDA headers): compiled into chunkvale_core in every build, so callers
// (the bindings) ask for the device count without #ifdefs.
#include "chunkvale/backend.h"

namespace chunkvale {
#ifdef CHUNKVALE_WITH_CUDA
int cuda_runtime_device_count();  // cuda_backend.cu
#endif

int cuda_device_count() {
#ifdef CHUNKVALE_WITH_CUDA
  return cuda_runtime_device_count();
#else
  return 0;
#endif
}

}  // namespace chunkvale
