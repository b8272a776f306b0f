// Eviction kernels: chunk digests (per layer, chunk and KV head, two float32 D-vectors, the
// same layout and definitions as the CPU backend) and the digest bound of decode queries.
// Header so that test_digest_emulation.cpp runs the same source on the CPU.
//
// Scoring is split in two: per query row, the group's query heads collapse into two
// D-vectors per KV head (every bound is linear in them once the sign of q is known), then
// one warp per candidate chunk takes a dot product with the chunk's digest. The bound of a
// chunk is thereby read once per candidate, whatever the group size.
#pragma once
#include "kernel_env.cuh"

namespace chunkvale {
namespace cuda {

constexpr int kDigestThreads = 128;  // digest and score-prep CTAs: 4 warps
constexpr int kScoreWarps = 4;       // candidates per score CTA
constexpr int kMaxChunk = 128;       // CacheConfig's largest chunk_size

// The kinds, as DigestKind numbers them.
constexpr int kCuboidMax = 0, kCuboidMean = 1, kSphere = 2;

template <typename T>
__device__ __forceinline__ float elem_at(const uint16_t* p) {
  return bits_to_float_as<T>(*p);
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int m = 16; m > 0; m >>= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
  return x;
}

// ---- digests of full chunks: one CTA per (chunk, KV head) ----
struct DigestParams {
  const uint16_t* pool_layer;  // the layer's first slot
  float* digests_layer;        // [chunks][kv_heads][2][D] of the layer
  const int32_t* chunks;       // digest index (logical chunk) of each entry
  const int32_t* slots;        // device slot holding its keys
  PoolView pool;               // tile strides (elements)
  int32_t kv_heads, C, D, kind;
};

// cuboid_max: (min, max) per dim. cuboid_mean: box centre, mean |k - centre| per dim.
// sphere: box centre, radius max_j |k_j - centre| in d1[0] (the rest zero).
template <typename T>
__global__ void __launch_bounds__(kDigestThreads) digest_kernel(const DigestParams p) {
  __shared__ float part[kDigestThreads / 32][kMaxChunk];  // sphere: per-warp partial |k_j - c|^2
  __shared__ float radius2[kDigestThreads / 32];
  const int i = int(blockIdx.x), h = int(blockIdx.y), t = int(threadIdx.x);
  const int C = p.C, D = p.D;
  const uint16_t* keys = p.pool.k_tile(p.pool_layer, p.slots[i], h);
  float* d0 = p.digests_layer + DigestView{0, p.kv_heads, D}.at(p.chunks[i], h);
  float* d1 = d0 + D;
  // Each thread owns dims t and t + 128 (D <= 256): consecutive threads read consecutive keys' dims.
  float lo[2], hi[2];
  for (int r = 0; r < 2; ++r) {
    const int d = t + r * kDigestThreads;
    lo[r] = 3.0e38f;
    hi[r] = -3.0e38f;
    if (d >= D) continue;
    for (int j = 0; j < C; ++j) {
      const float x = elem_at<T>(keys + j * D + d);
      lo[r] = fminf(lo[r], x);
      hi[r] = fmaxf(hi[r], x);
    }
  }
  if (p.kind == kCuboidMax) {
    for (int r = 0; r < 2; ++r) {
      const int d = t + r * kDigestThreads;
      if (d < D) {
        d0[d] = lo[r];
        d1[d] = hi[r];
      }
    }
    return;
  }
  float centre[2];
  for (int r = 0; r < 2; ++r) centre[r] = 0.5f * (lo[r] + hi[r]);
  if (p.kind == kCuboidMean) {
    for (int r = 0; r < 2; ++r) {
      const int d = t + r * kDigestThreads;
      if (d >= D) continue;
      float dev = 0.0f;
      for (int j = 0; j < C; ++j) dev += fabsf(elem_at<T>(keys + j * D + d) - centre[r]);
      d0[d] = centre[r];
      d1[d] = dev / float(C);
    }
    return;
  }
  // sphere: |k_j - c|^2 summed over dims, per warp then across warps.
  const int warp = t / 32, lane = t % 32;
  for (int j = 0; j < C; ++j) {
    float s = 0.0f;
    for (int r = 0; r < 2; ++r) {
      const int d = t + r * kDigestThreads;
      if (d < D) {
        const float x = elem_at<T>(keys + j * D + d) - centre[r];
        s += x * x;
      }
    }
    s = warp_sum(s);
    if (lane == 0) part[warp][j] = s;
  }
  __syncthreads();
  float m = 0.0f;
  for (int j = t; j < C; j += kDigestThreads) {
    float s = 0.0f;
    for (int w = 0; w < kDigestThreads / 32; ++w) s += part[w][j];
    m = fmaxf(m, s);
  }
  for (int k = 16; k > 0; k >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, k));
  if (lane == 0) radius2[warp] = m;
  __syncthreads();
  for (int r = 0; r < 2; ++r) {
    const int d = t + r * kDigestThreads;
    if (d >= D) continue;
    d0[d] = centre[r];
    d1[d] = 0.0f;
  }
  if (t == 0) {
    float r2 = 0.0f;
    for (int w = 0; w < kDigestThreads / 32; ++w) r2 = fmaxf(r2, radius2[w]);
    d1[0] = sqrtf(r2);
  }
}

// ---- score prep: per scored query row and KV head ----
// Per KV head g: x0, x1 (D each) and n (one float), so that a chunk's bound is
//   cuboid_max:  x0 . max + x1 . min      (x0 = sum of max(q, 0), x1 = sum of min(q, 0))
//   cuboid_mean: x0 . centre + x1 . dev   (x0 = sum of q, x1 = sum of |q|)
//   sphere:      x0 . centre + n * radius (n = sum of |q_h|)
// summed over the group's query heads.
// Per KV head 2 * D + 4 floats (x0, x1, n, padding): every vector stays 16-byte aligned.
__host__ __device__ constexpr int qsum_stride(int D) { return 2 * D + 4; }

struct ScorePrepParams {
  const uint16_t* q;  // [rows][q_heads][D]
  const int32_t* rows;
  float* qsum;        // [requests][kv_heads][qsum_stride(D)]
  int32_t q_heads, kv_heads, group, D, kind;
};

// One CTA per (scored row, KV head): enough CTAs to fill the GPU even for a few rows.
template <typename T>
__global__ void __launch_bounds__(kDigestThreads) score_prep_kernel(const ScorePrepParams p) {
  const int r = int(blockIdx.x), g = int(blockIdx.y), t = int(threadIdx.x);
  const int D = p.D, G = p.group, QS = qsum_stride(D);
  const uint16_t* q = p.q + (int64_t(p.rows[r]) * p.q_heads + int64_t(g) * G) * D;  // the group's heads
  float* out = p.qsum + (int64_t(r) * p.kv_heads + g) * QS;
  for (int d = t; d < D; d += kDigestThreads) {
    float x0 = 0.0f, x1 = 0.0f;
    for (int h = 0; h < G; ++h) {
      const float x = elem_at<T>(q + int64_t(h) * D + d);
      if (p.kind == kCuboidMax) {
        x0 += fmaxf(x, 0.0f);
        x1 += fminf(x, 0.0f);
      } else {
        x0 += x;
        x1 += fabsf(x);
      }
    }
    out[d] = x0;
    out[D + d] = x1;
  }
  // Sum of the group's query norms: one warp per head, then across warps.
  __shared__ float warp_sum_norms[kDigestThreads / 32];
  const int warp = t / 32, lane = t % 32;
  float nsum = 0.0f;
  for (int h = warp; h < G; h += kDigestThreads / 32) {
    float n2 = 0.0f;
    for (int d = lane; d < D; d += 32) {
      const float x = elem_at<T>(q + int64_t(h) * D + d);
      n2 += x * x;
    }
    nsum += sqrtf(warp_sum(n2));
  }
  if (lane == 0) warp_sum_norms[warp] = nsum;
  __syncthreads();
  if (t == 0) {
    float n = 0.0f;
    for (int w = 0; w < kDigestThreads / 32; ++w) n += warp_sum_norms[w];
    out[2 * D] = n;
  }
}

// ---- scores: one warp per candidate chunk ----
// Each lane takes 4 consecutive dims (16-byte loads); heads are unrolled so that a lane has
// several digest loads in flight (the kernel is bound by reading digests).
struct ScoreParams {
  const float* digests_layer;  // [chunks][kv_heads][2][D]
  const float* qsum;           // score_prep_kernel's output
  const int32_t* cand_req;     // request (qsum row) of each candidate
  const int32_t* cand_chunk;   // digest index of each candidate
  float* scores;
  int64_t n;
  int32_t kv_heads, D, kind;
};

__device__ __forceinline__ float dot4(const float4 a, const float4 b) {
  return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
}

// One lane's share of a digest bound of one query (summary x0, x1) against one KV head's
// digest (a = d0, b = d1), over dims 4 lane, 4 lane + 128, ...; the warp sums the lanes.
// The sphere's |q| * radius term is the caller's (once per warp sum, not per lane).
__device__ __forceinline__ float lane_bound(const float* a, const float* b, const float* x0, const float* x1, int D,
                                           int kind, int lane) {
  float acc = 0.0f;
  for (int d = 4 * lane; d < D; d += 128) {
    const float4 A = *reinterpret_cast<const float4*>(a + d);
    const float4 X0 = *reinterpret_cast<const float4*>(x0 + d);
    if (kind == kSphere) {
      acc += dot4(X0, A);
      continue;
    }
    const float4 Bv = *reinterpret_cast<const float4*>(b + d);
    const float4 X1 = *reinterpret_cast<const float4*>(x1 + d);
    if (kind == kCuboidMax)
      acc += dot4(X0, Bv) + dot4(X1, A);
    else
      acc += dot4(X0, A) + dot4(X1, Bv);
  }
  return acc;
}

__global__ void __launch_bounds__(kScoreWarps * 32) score_kernel(const ScoreParams p) {
  const int lane = int(threadIdx.x) % 32;
  const int64_t c = int64_t(blockIdx.x) * kScoreWarps + int64_t(threadIdx.x) / 32;
  if (c >= p.n) return;
  const int D = p.D, KV = p.kv_heads, QS = qsum_stride(D);
  const DigestView dv{0, KV, D};
  const float* dg = p.digests_layer + dv.at(p.cand_chunk[c], 0);
  const float* qs = p.qsum + int64_t(p.cand_req[c]) * KV * QS;
  float acc = 0.0f;
#pragma unroll 4
  for (int g = 0; g < KV; ++g) {
    const float* a = dg + g * dv.head_elems();  // d0
    const float* b = a + D;           // d1
    const float* x0 = qs + g * QS;
    acc += lane_bound(a, b, x0, x0 + D, D, p.kind, lane);
    if (p.kind == kSphere && lane == 0) acc += x0[2 * D] * b[0];
  }
  acc = warp_sum(acc);
  if (lane == 0) p.scores[c] = acc;
}

// ---- per-KV-head scores (per_kv_head selection): one warp per (candidate, KV head) ----
// A largest bound cannot pool the group's queries first: qsum holds each query head's own
// vectors (score_prep_kernel run with group 1 and kv_heads = q_heads). The score of candidate c
// for KV head g, the largest of its group's heads' bounds, goes to
//   scores[req_off[r] * kv_heads + g * n_r + (c - req_off[r])]   (r = c's request, n_r its count),
// so each (request, KV head) is one contiguous run that topk_kernel ranks as a request.
// ScoreParams's fields, with qsum [requests][kv_heads * group][qsum_stride(D)] and scores
// candidates * kv_heads, laid out as above.
struct ScoreHeadsParams : ScoreParams {
  const int32_t* req_off;  // requests + 1 candidate offsets
  int32_t group;
};

__global__ void __launch_bounds__(kScoreWarps * 32) score_heads_kernel(const ScoreHeadsParams p) {
  const int lane = int(threadIdx.x) % 32;
  const int64_t w = int64_t(blockIdx.x) * kScoreWarps + int64_t(threadIdx.x) / 32;
  if (w >= p.n * p.kv_heads) return;
  const int64_t c = w / p.kv_heads;
  const int g = int(w % p.kv_heads), D = p.D, G = p.group, QS = qsum_stride(D);
  const DigestView dv{0, p.kv_heads, D};
  const float* a = p.digests_layer + dv.at(p.cand_chunk[c], g);  // d0
  const float* b = a + D;                                         // d1
  const int32_t r = p.cand_req[c];
  float best = -INFINITY;
  for (int h = 0; h < G; ++h) {
    const float* x0 = p.qsum + ((int64_t(r) * p.kv_heads + g) * G + h) * QS;
    float acc = warp_sum(lane_bound(a, b, x0, x0 + D, D, p.kind, lane));
    if (p.kind == kSphere) acc += x0[2 * D] * b[0];  // |q_h| * radius
    best = fmaxf(best, acc);
  }
  if (lane == 0) {
    const int32_t o = p.req_off[r], n_r = p.req_off[r + 1] - o;
    p.scores[int64_t(o) * p.kv_heads + int64_t(g) * n_r + (c - o)] = best;
  }
}

// ---- top-k per request: k passes of a block-wide arg-max ----
// Keys as in cpp/src/cpu/top_k.h (score bits made order-preserving above the candidate index):
// unique, so pass j takes the largest key below pass j-1's, best first, ties to the later
// candidate. k is small (top-k chunks), the candidates are re-read from L1/L2 each pass.
constexpr int kTopKThreads = 256;

struct TopKParams {
  const float* scores;     // every request's candidates, flattened
  const int32_t* req_off;  // count + 1 offsets into scores
  int32_t* top;            // [count][k]
  int32_t k;
};

__device__ __forceinline__ unsigned long long rank_key_device(float score, uint32_t index) {
  uint32_t u = __float_as_uint(score);
  if (u == 0x80000000u) u = 0;
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<unsigned long long>(u) << 32) | index;
}

__global__ void __launch_bounds__(kTopKThreads) topk_kernel(const TopKParams p) {
  __shared__ unsigned long long warp_best[kTopKThreads / 32];
  __shared__ unsigned long long pass_best;
  const int r = int(blockIdx.x), t = int(threadIdx.x), lane = t % 32, warp = t / 32;
  const int32_t base = p.req_off[r], n = p.req_off[r + 1] - base;
  const int k = p.k < n ? p.k : n;
  unsigned long long prev = ~0ull;
  for (int j = 0; j < k; ++j) {
    unsigned long long best = 0;
    for (int c = t; c < n; c += kTopKThreads) {
      const unsigned long long key = rank_key_device(p.scores[base + c], uint32_t(c));
      if (key < prev && key > best) best = key;
    }
    for (int m = 16; m > 0; m >>= 1) {
      const unsigned long long o = __shfl_xor_sync(0xffffffffu, best, m);
      best = o > best ? o : best;
    }
    if (lane == 0) warp_best[warp] = best;
    __syncthreads();
    if (t == 0) {
      unsigned long long m = 0;
      for (int w = 0; w < kTopKThreads / 32; ++w) m = warp_best[w] > m ? warp_best[w] : m;
      pass_best = m;
      p.top[int64_t(r) * p.k + j] = int32_t(uint32_t(m));
    }
    __syncthreads();
    prev = pass_best;
  }
}

}  // namespace cuda
}  // namespace chunkvale
