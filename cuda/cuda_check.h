// Small CUDA runtime helpers shared by the backend's source files: errors as exceptions,
// the cache's device made current for one call, and whether a stream is being captured.
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace chunkvale {
namespace cuda {

[[noreturn]] inline void throw_cuda(cudaError_t e, const char* what) {
  throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorName(e) + " (" +
                           cudaGetErrorString(e) + ")");
}
#define CV_CUDA(expr, what)                                      \
  do {                                                           \
    cudaError_t e_ = (expr);                                     \
    if (e_ != cudaSuccess) ::chunkvale::cuda::throw_cuda(e_, what); \
  } while (0)

// Makes the cache's device current for one call and restores the caller's.
class DeviceGuard {
 public:
  explicit DeviceGuard(int dev) {
    CV_CUDA(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != dev) CV_CUDA(cudaSetDevice(dev), "cudaSetDevice");
    else prev_ = -1;
  }
  ~DeviceGuard() {
    if (prev_ >= 0) (void)cudaSetDevice(prev_);
  }

 private:
  int prev_ = -1;
};

inline bool is_capturing(cudaStream_t s) {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(s, &st) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return st != cudaStreamCaptureStatusNone;
}

inline int grid_for(long long work, int threads) {
  const long long g = (work + threads - 1) / threads;
  return int(g < 1 ? 1 : (g > 65536 ? 65536 : g));
}

}  // namespace cuda
}  // namespace chunkvale
