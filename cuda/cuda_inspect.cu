// CudaBackend's test and debugging readers (Inspect): synchronous copies back to the host,
// never on a hot path.
#include <cuda_fp16.h>

#include <cstring>
#include <vector>

#include "chunkvale/detail/dtype_convert.h"
#include "chunkvale/detail/pool_view.h"
#include "chunkvale/errors.h"
#include "cuda_backend.h"
#include "cuda_check.h"

namespace chunkvale {
namespace cuda {

void CudaBackend::read_tile(int layer, int32_t slot, int kv, int head, float* dst) const {
  DeviceGuard g(device_);
  const size_t n = size_t(cfg_.chunk_size) * cfg_.head_dim;
  std::vector<uint16_t> buf(n);
  const uint16_t* src = static_cast<const uint16_t*>(pool_) + layer_offset(layer) +
                        PoolView::chunkvale_layout(cfg_.kv_heads, cfg_.chunk_size, cfg_.head_dim).tile(slot, kv, head);
  CV_CUDA(cudaDeviceSynchronize(), "cudaDeviceSynchronize (read_tile)");
  CV_CUDA(cudaMemcpy(buf.data(), src, n * 2, cudaMemcpyDeviceToHost), "cudaMemcpy (read_tile)");
  for (size_t i = 0; i < n; ++i)
    dst[i] = cfg_.dtype == DType::Float16 ? bits_to_float_as<__half>(buf[i]) : bf16_to_float(buf[i]);
}

void CudaBackend::read_digest(int layer, int32_t slot, int head, float* dst) const {
  if (!digests_) throw ValueError("eviction: digests are off for this cache");
  DeviceGuard g(device_);
  const size_t D = size_t(cfg_.head_dim);
  const DigestView dv{slots_, cfg_.kv_heads, cfg_.head_dim};
  const float* src = digests_ + dv.layer(layer) + dv.at(slot, head);
  CV_CUDA(cudaDeviceSynchronize(), "cudaDeviceSynchronize (read_digest)");
  CV_CUDA(cudaMemcpy(dst, src, 2 * D * 4, cudaMemcpyDeviceToHost), "cudaMemcpy (read_digest)");
}

}  // namespace cuda
}  // namespace chunkvale
