// Plain C++ (no CUDA headers): compiled into chunkvale_core in every build.
#include "cuda_api.h"

namespace chunkvale {
#ifdef CHUNKVALE_WITH_CUDA
int cuda_runtime_device_count();  // cuda_backend.cu
#endif

namespace cuda_api {
namespace {
thread_local uintptr_t g_stream = 0;
}

void set_thread_stream(uintptr_t stream) { g_stream = stream; }
uintptr_t thread_stream() { return g_stream; }

int device_count() {
#ifdef CHUNKVALE_WITH_CUDA
  return cuda_runtime_device_count();
#else
  return 0;
#endif
}

bool built() {
#ifdef CHUNKVALE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace cuda_api
}  // namespace chunkvale
