#include "attention_launch.cuh"

namespace chunkvale {
namespace cuda {
cudaError_t launch_attention_f16(const AttnParams& p, int D, int n_items, cudaStream_t stream) {
  return launch_attention_t<__half>(p, D, n_items, stream);
}
}  // namespace cuda
}  // namespace chunkvale
