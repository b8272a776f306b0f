#include "attention_launch.cuh"

namespace chunkvale {
namespace cuda {
cudaError_t launch_attention_bf16(const AttnParams& p, int D, int n_items, cudaStream_t stream) {
  return launch_attention_t<__nv_bfloat16>(p, D, n_items, stream);
}
}  // namespace cuda
}  // namespace chunkvale
