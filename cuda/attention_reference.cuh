// The reference attention kernel (CHUNKVALE_CUDA_KERNEL=reference). Included by
// attention_kernels.cuh, whose items, partials and softmax helpers it shares.
#pragma once

namespace chunkvale {
namespace cuda {

struct Exp2Exact {  // exp2f, not the approximate ex2: the reference is plain fp32 arithmetic
  __device__ __forceinline__ float operator()(float x) const { return exp2f(x); }
};

// ---- reference kernel: same items and partials, plain fp32 arithmetic, one warp per
// stacked row walking its keys one by one. Slow; for localising a fault on a GPU
// (CHUNKVALE_CUDA_KERNEL=reference): if it passes where attention_kernel fails, the fault is
// in the tensor-core kernel, not in the plan, the append or the merge. ----
template <typename T>
__global__ void __launch_bounds__(kThreads) reference_attention_kernel(const AttnParams p, int D) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const DevItem it = p.items[blockIdx.x];
  const int kvh = blockIdx.y, G = p.group;
  const bool causal = (it.flags & kItemCausal) != 0;
  const int real_rows = it.n_tok * G;
  const T* layer = static_cast<const T*>(p.pool_layer);
  const T* qb = static_cast<const T*>(p.q);
  for (int r = warp; r < real_rows; r += kThreads / 32) {
    const int t = r / G, g = r % G;
    const int row = p.unit_rows[it.row_begin + t];
    const int pos = p.positions[row];
    const T* q = qb + (int64_t(row) * p.q_heads + int64_t(kvh) * G + g) * D;
    float qv[8], o[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      qv[k] = lane + 32 * k < D ? to_float(q[lane + 32 * k]) : 0.0f;
      o[k] = 0.0f;
    }
    SoftmaxState<float> st{-INFINITY, 0.0f};
    for (int c = it.chunk_begin; c < it.chunk_end; ++c) {
      const T* K = p.pool.k_tile(layer, p.chunk_slot[c], kvh);
      const T* V = p.pool.v_tile(layer, p.chunk_slot[c], kvh);
      for (int j = 0; j < p.chunk_valid[c]; ++j) {
        if (causal && p.chunk_start[c] + j > pos) break;
        float dot = 0.0f;
#pragma unroll
        for (int k = 0; k < 8; ++k)
          if (lane + 32 * k < D) dot += qv[k] * to_float(K[int64_t(j) * D + lane + 32 * k]);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        const float x = dot * p.scale_log2;
        const float alpha = st.move_max(x, Exp2Exact{}, FMax{}), pw = exp2f(x - st.base());
        st.add(alpha, pw);
#pragma unroll
        for (int k = 0; k < 8; ++k)
          if (lane + 32 * k < D) o[k] = o[k] * alpha + pw * to_float(V[int64_t(j) * D + lane + 32 * k]);
      }
    }
    const int64_t pi = (int64_t(kvh) * p.p_tok + it.pbase) * G + r;
#pragma unroll
    for (int k = 0; k < 8; ++k)
      if (lane + 32 * k < D) p.part_o[pi * D + lane + 32 * k] = o[k];
    if (lane == 0) {
      p.part_ml[pi * 2] = st.m;
      p.part_ml[pi * 2 + 1] = st.l;
    }
  }
}

}  // namespace cuda
}  // namespace chunkvale
