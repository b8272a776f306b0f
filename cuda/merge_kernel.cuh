// The merge kernel: each packed row's softmax partials combined by log-sum-exp
// (PartialMerge, softmax_state.h), the normalised output in the cache dtype and the
// natural-log LSE. Included by attention_kernels.cuh.
#pragma once

namespace chunkvale {
namespace cuda {

// ---- merge: one warp per (packed row, query head) ----
// One CTA per (packed row, query head). The row's partials are dealt to the 4 warps; a warp's
// lanes read 32 partials' (max, sum) in one round trip, then stream their outputs as float4
// columns, unrolled so that several partials' loads are in flight. The warps then combine
// through shared memory. Rows merge tens of partials when a long shared prefix was split for
// parallelism, so the latency of that walk, not its bytes, is what this layout attacks.
template <typename T>
__global__ void __launch_bounds__(128) merge_kernel(const MergeParams p) {
  __shared__ float4 acc_s[4][64];  // D / 4 <= 64
  __shared__ float red_s[4][2];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t idx = blockIdx.x;
  const int row = int(idx / p.q_heads), h = int(idx % p.q_heads);
  const int G = p.group, kvh = h / G, g = h % G, D = p.D, D4 = p.D / 4;
  const int b = p.row_off[row], e = p.row_off[row + 1];
  const int64_t hb = int64_t(kvh) * p.p_tok;
  PartialMerge<Log2Units> mg;  // this thread's share of the row's partials, then the whole row's
  for (int i = b + int(threadIdx.x); i < e; i += 128) mg.see_max(p.part_ml[((hb + p.row_parts[i]) * G + g) * 2]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) mg.see_max(__shfl_xor_sync(0xffffffffu, mg.M, off));
  if (lane == 0) red_s[warp][0] = mg.M;
  __syncthreads();
  mg.M = fmaxf(fmaxf(red_s[0][0], red_s[1][0]), fmaxf(red_s[2][0], red_s[3][0]));
  float4 acc[2] = {make_float4(0.f, 0.f, 0.f, 0.f), make_float4(0.f, 0.f, 0.f, 0.f)};
  for (int i0 = b + warp * 32; i0 < e; i0 += 128) {
    int pi = 0;  // this lane's partial (i0 + lane) and its weight; 0 past the end
    float w = 0.0f;
    if (i0 + lane < e) {
      pi = int((hb + p.row_parts[i0 + lane]) * G + g);
      w = mg.add(p.part_ml[int64_t(pi) * 2], p.part_ml[int64_t(pi) * 2 + 1]);
    }
    const int n = min(32, e - i0);
#pragma unroll 4
    for (int j = 0; j < n; ++j) {
      const float wj = __shfl_sync(0xffffffffu, w, j);
      const int pj = __shfl_sync(0xffffffffu, pi, j);
      const float4* po = reinterpret_cast<const float4*>(p.part_o + int64_t(pj) * D);
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        if (lane + 32 * k < D4) {
          const float4 x = po[lane + 32 * k];
          acc[k].x += wj * x.x;
          acc[k].y += wj * x.y;
          acc[k].z += wj * x.z;
          acc[k].w += wj * x.w;
        }
      }
    }
  }
  float L = mg.L;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) L += __shfl_xor_sync(0xffffffffu, L, off);
#pragma unroll
  for (int k = 0; k < 2; ++k)
    if (lane + 32 * k < D4) acc_s[warp][lane + 32 * k] = acc[k];
  if (lane == 0) red_s[warp][1] = L;
  __syncthreads();
  mg.L = red_s[0][1] + red_s[1][1] + red_s[2][1] + red_s[3][1];
  const float inv = mg.inv_sum();
  const int64_t o = int64_t(row) * p.out_heads + p.head0 + h;  // (row, head) in out and lse
  T* out = static_cast<T*>(p.out) + o * D;
  for (int c = int(threadIdx.x); c < D4; c += 128) {
    const float4 a = acc_s[0][c], b1 = acc_s[1][c], c2 = acc_s[2][c], d3 = acc_s[3][c];
    out[4 * c + 0] = from_float<T>((a.x + b1.x + c2.x + d3.x) * inv);
    out[4 * c + 1] = from_float<T>((a.y + b1.y + c2.y + d3.y) * inv);
    out[4 * c + 2] = from_float<T>((a.z + b1.z + c2.z + d3.z) * inv);
    out[4 * c + 3] = from_float<T>((a.w + b1.w + c2.w + d3.w) * inv);
  }
  if (p.lse && threadIdx.x == 0) p.lse[o] = mg.lse();
}

}  // namespace cuda
}  // namespace chunkvale
