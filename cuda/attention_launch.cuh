// Launch helper shared by attention_f16.cu and attention_bf16.cu (one dtype per file, so
// the two compile in parallel).
#pragma once
#include <atomic>

#include "attention_kernels.cuh"

namespace chunkvale {
namespace cuda {

template <typename T, int D, typename S = AttnShape<D>>
cudaError_t launch_attention_dim(const AttnParams& p, int n_items, cudaStream_t stream) {
  constexpr size_t smem = S::smem_bytes;
  // Above 48 KB a kernel needs its dynamic shared-memory limit raised, once per device.
  static std::atomic<uint64_t> raised{0};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const uint64_t bit = dev < 64 ? (uint64_t(1) << dev) : 0;
  if (smem > 48 * 1024 && (bit == 0 || !(raised.load() & bit))) {
    err = cudaFuncSetAttribute(attention_kernel<T, D, S>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
    raised.fetch_or(bit);
  }
  attention_kernel<T, D, S><<<dim3(unsigned(n_items), unsigned(p.kv_heads)), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_attention_t(const AttnParams& p, int D, int n_items, cudaStream_t stream) {
  switch (D) {
    case 64: return launch_attention_dim<T, 64>(p, n_items, stream);
#ifndef CHUNKVALE_CUDA_LEAN
    case 80: return launch_attention_dim<T, 80>(p, n_items, stream);
    case 96: return launch_attention_dim<T, 96>(p, n_items, stream);
#endif
    case 128: return launch_attention_dim<T, 128>(p, n_items, stream);
    case 256: return launch_attention_dim<T, 256>(p, n_items, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace chunkvale

// Defines the launcher `name` (declared in attention_kernels.cuh) for element type T.
#define CHUNKVALE_DEFINE_ATTENTION_LAUNCH(name, T)                                              \
  cudaError_t chunkvale::cuda::name(const AttnParams& p, int D, int n_items, cudaStream_t stream) { \
    return launch_attention_t<T>(p, D, n_items, stream);                                        \
  }
