// CudaBackend's test and debugging readers (Inspect): synchronous copies back to the host,
// never on a hot path.
#include <cuda_fp16.h>

#include <cstring>
#include <vector>

#include "chunkvale/errors.h"
#include "cuda_backend.h"
#include "cuda_check.h"

namespace chunkvale {
namespace cuda {

namespace {
float bf16_to_float(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
float f16_to_float(uint16_t h) {
  __half_raw r;
  r.x = h;
  return __half2float(__half(r));
}
}  // namespace

void CudaBackend::read_tile(int layer, int32_t slot, int kv, int head, float* dst) const {
  DeviceGuard g(device_);
  const size_t n = size_t(cfg_.chunk_size) * cfg_.head_dim;
  std::vector<uint16_t> buf(n);
  const uint16_t* src = static_cast<const uint16_t*>(pool_) + layer_offset(layer) + size_t(slot) * slot_stride_ +
                        (size_t(kv) * cfg_.kv_heads + size_t(head)) * n;
  CV_CUDA(cudaDeviceSynchronize(), "cudaDeviceSynchronize (read_tile)");
  CV_CUDA(cudaMemcpy(buf.data(), src, n * 2, cudaMemcpyDeviceToHost), "cudaMemcpy (read_tile)");
  for (size_t i = 0; i < n; ++i)
    dst[i] = cfg_.dtype == DType::Float16 ? f16_to_float(buf[i]) : bf16_to_float(buf[i]);
}

void CudaBackend::read_digest(int layer, int32_t slot, int head, float* dst) const {
  if (!digests_) throw ValueError("eviction: digests are off for this cache");
  DeviceGuard g(device_);
  const size_t D = size_t(cfg_.head_dim);
  const float* src = digests_ + ((size_t(layer) * size_t(slots_) + size_t(slot)) * cfg_.kv_heads + size_t(head)) * 2 * D;
  CV_CUDA(cudaDeviceSynchronize(), "cudaDeviceSynchronize (read_digest)");
  CV_CUDA(cudaMemcpy(dst, src, 2 * D * 4, cudaMemcpyDeviceToHost), "cudaMemcpy (read_digest)");
}

}  // namespace cuda
}  // namespace chunkvale
