// Two-phase-partition attention on the GPU: one kernel for every item of a step (chunk-
// first and sequence-first alike), then a merge kernel. See device_plan.h for items.
//
// Attention kernel, one CTA (4 warps) per (item, KV head):
//   * Q tile: the item's stacked rows (token row x query head of the GQA group, row-major
//     as t * group + g), up to 64, staged in shared memory as the cache dtype.
//   * Keys stream through shared memory in 16-key blocks (a 16 x D slab of one chunk's
//     K and V tile; a chunk of C tokens is C / 16 blocks), SB blocks per stage, two stages
//     (cp.async, zero-filled past a chunk's valid keys).
//   * Warps are laid out warps_m x warps_n (warps_n = 1, 2 or 4, chosen per item): warp
//     (wm, wn) owns stacked rows [16 wm, 16 wm + 16) and the key blocks whose running
//     index is wn mod warps_n. Chunk-first items with many rows run 4 x 1 (every warp
//     sees every key: one K/V read for up to 64 stacked rows), decode items run 1 x 4
//     (flash-decoding inside the CTA: the warps split the keys).
//   * Per 16-key block and warp: S = Q K^T with mma.sync m16n8k16 (fp32 accumulate),
//     mask (valid keys; causal: key position <= row position), online softmax in base 2,
//     P (rounded to the cache dtype) V with mma.sync into fp32 accumulators.
//   * End: the warps of a row group combine through shared memory and write the item's
//     partials (max in log2 units, sum, unnormalised output) in fp32.
// Merge kernel, one warp per (packed row, query head): the row's partials by log-sum-exp,
// normalised output in the cache dtype and the natural-log LSE.
#pragma once
#include <cstdint>

#ifdef CHUNKVALE_EMULATE
#include "emulate.h"  // host emulation of the warp-level primitives (test_kernel_emulation.cpp)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include "device_plan.h"

namespace chunkvale {
namespace cuda {

constexpr int kThreads = 128;  // 4 warps
constexpr int kTileRows = 64;  // max stacked rows of an item

// SB 16-key blocks per pipeline stage, ST stages in flight. The shared-memory footprint
// decides how many CTAs share an SM, and decode is latency-bound: on an H100 (bench/gpu_sweep.py,
// D = 128) 2 x 2 (52 KB, 4 CTAs per SM) beat 4 x 2 (87 KB, 2 per SM) by 15-25% on shared-prefix
// decode, and 2 x 3, 1 x 4 and 2 x 4 by less or not at all.
template <int D, int SB_ = 2, int ST_ = 2>
struct AttnShape {
  static_assert(D % 16 == 0, "head_dim must be a multiple of 16");
  static_assert(ST_ >= 2, "at least two stages (load one while computing the other)");
  static constexpr int SB = SB_;                 // 16-key blocks per stage
  static constexpr int ST = ST_;                 // stages
  static constexpr int LDS = D + 8;              // smem row stride (elements): conflict-free ldmatrix
  static constexpr int LDO = D + 8;              // fp32 combine row stride
  static constexpr size_t q_bytes = size_t(kTileRows) * LDS * 2;
  static constexpr size_t stage_bytes = size_t(ST) * 2 * SB * 16 * LDS * 2;  // ST stages x {K, V}
  static constexpr size_t combine_bytes = size_t(4) * 16 * LDO * 4 + size_t(4) * 16 * 2 * 4;
  static constexpr size_t body_bytes = stage_bytes > combine_bytes ? stage_bytes : combine_bytes;
  static constexpr size_t smem_bytes = q_bytes + body_bytes;
};

#ifndef CHUNKVALE_EMULATE
// ---- small PTX helpers ----
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool full) {
  const int n = full ? 16 : 0;  // 0: zero-fill, nothing read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

template <typename T>
struct Mma;
template <>
struct Mma<__half> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
template <>
struct Mma<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

__device__ __forceinline__ float fast_exp2(float x) {  // exp2(-inf) = +0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

#endif  // CHUNKVALE_EMULATE

// An item's chunk table (slot, valid keys, first position). Its first kMetaChunks entries are
// staged in shared memory once, so that walking the key stream costs a shared-memory read per
// block rather than a chain of dependent global round trips; longer items read the rest from
// global memory.
constexpr int kMetaChunks = 128;
struct ItemChunks {
  const int32_t *slot_s, *valid_s, *start_s;  // shared: chunks [begin, begin + kMetaChunks)
  const int32_t *slot_g, *valid_g, *start_g;  // global: the whole plan
  int begin;
  __device__ __forceinline__ int valid(int c) const {
    return c - begin < kMetaChunks ? valid_s[c - begin] : valid_g[c];
  }
  __device__ __forceinline__ int slot(int c) const {
    return c - begin < kMetaChunks ? slot_s[c - begin] : slot_g[c];
  }
  __device__ __forceinline__ int start(int c) const {
    return c - begin < kMetaChunks ? start_s[c - begin] : start_g[c];
  }
};

// The key-block stream of an item: its chunks in order, each cut into 16-key blocks.
struct KeyCursor {
  int c, kb;  // chunk index, key offset in the chunk (multiple of 16)
};
__device__ __forceinline__ void cursor_skip_empty(KeyCursor& k, int c_end, const ItemChunks& ch) {
  while (k.c < c_end && ch.valid(k.c) <= 0) ++k.c;
}
__device__ __forceinline__ void cursor_next(KeyCursor& k, int c_end, const ItemChunks& ch) {
  k.kb += 16;
  if (k.kb >= ch.valid(k.c)) {
    ++k.c;
    k.kb = 0;
    cursor_skip_empty(k, c_end, ch);
  }
}

template <typename T, int D, typename S = AttnShape<D>>
__global__ void __launch_bounds__(kThreads) attention_kernel(const AttnParams p) {
  constexpr int SB = S::SB, ST = S::ST, LDS = S::LDS, LDO = S::LDO;
  constexpr int KSTEPS = D / 16, NT = D / 8;
#ifdef CHUNKVALE_EMULATE
  unsigned char* smem = emu::dynamic_smem();
#else
  extern __shared__ __align__(128) unsigned char smem[];
#endif
  T* Qs = reinterpret_cast<T*>(smem);
  T* KV = reinterpret_cast<T*>(smem + S::q_bytes);  // [stage][K|V][SB*16][LDS]
  float* Os = reinterpret_cast<float*>(smem + S::q_bytes);              // after the loop
  float* MLs = Os + 4 * 16 * LDO;
  __shared__ int pos_s[kTileRows];

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const DevItem it = p.items[blockIdx.x];
  const int kvh = blockIdx.y;
  const int G = p.group;
  const int warps_n = item_warps_n(it.flags);
  const int wm = warp / warps_n, wn = warp % warps_n;
  const bool causal = (it.flags & kItemCausal) != 0;
  const int real_rows = it.n_tok * G;
  const int tile_rows = 16 * (4 / warps_n);
  const int64_t tileCD = int64_t(p.C) * D;

  // ---- the item's chunk table, then the K/V stream ----
  __shared__ int32_t meta_s[3][kMetaChunks];
  const int c_end = it.chunk_end;
  for (int i = tid; i < c_end - it.chunk_begin && i < kMetaChunks; i += kThreads) {
    meta_s[0][i] = p.chunk_slot[it.chunk_begin + i];
    meta_s[1][i] = p.chunk_valid[it.chunk_begin + i];
    meta_s[2][i] = p.chunk_start[it.chunk_begin + i];
  }
  __syncthreads();
  const ItemChunks ch{meta_s[0], meta_s[1], meta_s[2], p.chunk_slot, p.chunk_valid, p.chunk_start, it.chunk_begin};
  const T* layer = static_cast<const T*>(p.pool_layer);
  KeyCursor lc{it.chunk_begin, 0};
  cursor_skip_empty(lc, c_end, ch);
  KeyCursor cc = lc;

  auto load_stage = [&](int buf) {
    for (int b = 0; b < SB && lc.c < c_end; ++b) {
      const int nvalid = min(16, ch.valid(lc.c) - lc.kb);
      const T* kg = layer + int64_t(ch.slot(lc.c)) * p.slot_stride + int64_t(kvh) * tileCD +
                    int64_t(lc.kb) * D;
      const T* vg = kg + int64_t(p.kv_heads) * tileCD;
      T* ks = KV + ((buf * 2 + 0) * SB * 16 + b * 16) * LDS;
      T* vs = KV + ((buf * 2 + 1) * SB * 16 + b * 16) * LDS;
      constexpr int VPR = D / 8;
      for (int v = tid; v < 16 * VPR; v += kThreads) {
        const int j = v / VPR, c = v % VPR;
        const bool ok = j < nvalid;
        const int jj = ok ? j : 0;
        cp_async16(ks + j * LDS + c * 8, kg + jj * D + c * 8, ok);
        cp_async16(vs + j * LDS + c * 8, vg + jj * D + c * 8, ok);
      }
      cursor_next(lc, c_end, ch);
    }
  };

  float o[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;  // rows lane/4 and lane/4 + 8
  const bool warp_active = wm * 16 < real_rows;

  // The first stages go out before the Q tile is read: their latency overlaps it.
#pragma unroll
  for (int i = 0; i < ST - 1; ++i) {
    load_stage(i);
    cp_async_commit();
  }
  // ---- Q tile and row positions ----
  {
    const T* q = static_cast<const T*>(p.q);
    constexpr int VPR = D / 8;  // 16-byte vectors per row
    for (int v = tid; v < tile_rows * VPR; v += kThreads) {
      const int r = v / VPR, c = v % VPR;
      uint4 val = make_uint4(0, 0, 0, 0);
      if (r < real_rows) {
        const int t = r / G, g = r % G;
        const int row = p.unit_rows[it.row_begin + t];
        val = *reinterpret_cast<const uint4*>(q + (int64_t(row) * p.q_heads + int64_t(kvh) * G + g) * D + c * 8);
      }
      *reinterpret_cast<uint4*>(Qs + r * LDS + c * 8) = val;
    }
    if (tid < kTileRows)
      pos_s[tid] = tid < real_rows ? p.positions[p.unit_rows[it.row_begin + tid / G]] : -1;
  }

  __syncthreads();  // Q tile and positions visible
  const int pr0 = pos_s[wm * 16 + (lane >> 2)], pr1 = pos_s[wm * 16 + (lane >> 2) + 8];
  const int qrow = wm * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, qcol = (lane >> 4) * 8;
  const int krow = (lane & 7) + (lane >> 4) * 8, kcol = ((lane >> 3) & 1) * 8;
  const int vrow = (lane & 7) + ((lane >> 3) & 1) * 8, vcol = (lane >> 4) * 8;

  for (int s = 0;; ++s) {
    load_stage((s + ST - 1) % ST);  // nothing once the stream is exhausted; the group stays empty
    cp_async_commit();
    cp_async_wait<ST - 1>();        // stage s has landed
    __syncthreads();
    const T* Ks = KV + (((s % ST) * 2 + 0) * SB * 16) * LDS;
    const T* Vs = KV + (((s % ST) * 2 + 1) * SB * 16) * LDS;
    for (int b = 0; b < SB && cc.c < c_end; ++b) {
      const int kstart = ch.start(cc.c) + cc.kb;
      const int nv = min(16, ch.valid(cc.c) - cc.kb);
      if (warp_active && ((s * SB + b) % warps_n) == wn) {
        // S = Q K^T for this warp's 16 rows and the block's 16 keys.
        float sc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int k = 0; k < KSTEPS; ++k) {
          uint32_t a[4], kb[4];
          ldmatrix_x4(a, Qs + qrow * LDS + k * 16 + qcol);
          ldmatrix_x4(kb, Ks + (b * 16 + krow) * LDS + k * 16 + kcol);
          Mma<T>::run(sc[0], a, kb[0], kb[1]);
          Mma<T>::run(sc[1], a, kb[2], kb[3]);
        }
        // Mask, scale to log2 units, online softmax.
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int j = n * 8 + (lane & 3) * 2 + (e & 1);
            const int pr = e < 2 ? pr0 : pr1;
            const bool ok = j < nv && (!causal || kstart + j <= pr);
            const float x = ok ? sc[n][e] * p.scale_log2 : -INFINITY;
            sc[n][e] = x;
            if (e < 2) mx0 = fmaxf(mx0, x); else mx1 = fmaxf(mx1, x);
          }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        const float b0 = mn0 == -INFINITY ? 0.0f : mn0, b1 = mn1 == -INFINITY ? 0.0f : mn1;
        const float al0 = fast_exp2(m0 - b0), al1 = fast_exp2(m1 - b1);
        m0 = mn0;
        m1 = mn1;
        float s0 = 0.0f, s1 = 0.0f;
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          sc[n][0] = fast_exp2(sc[n][0] - b0);
          sc[n][1] = fast_exp2(sc[n][1] - b0);
          sc[n][2] = fast_exp2(sc[n][2] - b1);
          sc[n][3] = fast_exp2(sc[n][3] - b1);
          s0 += sc[n][0] + sc[n][1];
          s1 += sc[n][2] + sc[n][3];
        }
        l0 = l0 * al0 + s0;
        l1 = l1 * al1 + s1;
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          o[n][0] *= al0;
          o[n][1] *= al0;
          o[n][2] *= al1;
          o[n][3] *= al1;
        }
        // O += P V: the S accumulators are the A fragment of P (16 rows x 16 keys).
        uint32_t pa[4];
        pa[0] = Mma<T>::pack(sc[0][0], sc[0][1]);
        pa[1] = Mma<T>::pack(sc[0][2], sc[0][3]);
        pa[2] = Mma<T>::pack(sc[1][0], sc[1][1]);
        pa[3] = Mma<T>::pack(sc[1][2], sc[1][3]);
#pragma unroll
        for (int dn = 0; dn < D / 16; ++dn) {
          uint32_t vb[4];
          ldmatrix_x4_trans(vb, Vs + (b * 16 + vrow) * LDS + dn * 16 + vcol);
          Mma<T>::run(o[2 * dn], pa, vb[0], vb[1]);
          Mma<T>::run(o[2 * dn + 1], pa, vb[2], vb[3]);
        }
      }
      cursor_next(cc, c_end, ch);
    }
    __syncthreads();  // the stage buffer is refilled next iteration
    if (cc.c >= c_end) break;  // the compute cursor consumed what the load cursor issued
  }
  cp_async_wait<0>();
  __syncthreads();

  // ---- combine the warps of each row group, write the partials ----
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  {
    float* ow = Os + warp * 16 * LDO;
    const int r0 = lane >> 2, c0 = (lane & 3) * 2;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      *reinterpret_cast<float2*>(ow + r0 * LDO + n * 8 + c0) = make_float2(o[n][0], o[n][1]);
      *reinterpret_cast<float2*>(ow + (r0 + 8) * LDO + n * 8 + c0) = make_float2(o[n][2], o[n][3]);
    }
    if ((lane & 3) == 0) {
      float* ml = MLs + warp * 16 * 2;
      ml[r0 * 2] = m0;
      ml[r0 * 2 + 1] = l0;
      ml[(r0 + 8) * 2] = m1;
      ml[(r0 + 8) * 2 + 1] = l1;
    }
  }
  __syncthreads();
  const int64_t pbase = (int64_t(kvh) * p.p_tok + it.pbase) * G;
  for (int idx = tid; idx < real_rows * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    const int g0 = (r >> 4) * warps_n, lr = r & 15;
    float M = -INFINITY;
    for (int w = 0; w < warps_n; ++w) M = fmaxf(M, MLs[(g0 + w) * 32 + lr * 2]);
    const float base = M == -INFINITY ? 0.0f : M;
    float acc = 0.0f, L = 0.0f;
    for (int w = 0; w < warps_n; ++w) {
      const float wt = fast_exp2(MLs[(g0 + w) * 32 + lr * 2] - base);
      acc += wt * Os[((g0 + w) * 16 + lr) * LDO + d];
      L += wt * MLs[(g0 + w) * 32 + lr * 2 + 1];
    }
    p.part_o[(pbase + r) * D + d] = acc;
    if (d == 0) {
      p.part_ml[(pbase + r) * 2] = M;
      p.part_ml[(pbase + r) * 2 + 1] = L;
    }
  }
}

// ---- reference kernel: same items and partials, plain fp32 arithmetic, one warp per
// stacked row walking its keys one by one. Slow; for localising a fault on a GPU
// (CHUNKVALE_CUDA_KERNEL=reference): if it passes where attention_kernel fails, the fault is
// in the tensor-core kernel, not in the plan, the append or the merge. ----
template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__global__ void __launch_bounds__(kThreads) reference_attention_kernel(const AttnParams p, int D) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const DevItem it = p.items[blockIdx.x];
  const int kvh = blockIdx.y, G = p.group;
  const bool causal = (it.flags & kItemCausal) != 0;
  const int real_rows = it.n_tok * G;
  const int64_t tileCD = int64_t(p.C) * D;
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
    float m = -INFINITY, l = 0.0f;
    for (int c = it.chunk_begin; c < it.chunk_end; ++c) {
      const T* K = layer + int64_t(p.chunk_slot[c]) * p.slot_stride + int64_t(kvh) * tileCD;
      const T* V = K + int64_t(p.kv_heads) * tileCD;
      for (int j = 0; j < p.chunk_valid[c]; ++j) {
        if (causal && p.chunk_start[c] + j > pos) break;
        float dot = 0.0f;
#pragma unroll
        for (int k = 0; k < 8; ++k)
          if (lane + 32 * k < D) dot += qv[k] * to_float(K[int64_t(j) * D + lane + 32 * k]);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        const float x = dot * p.scale_log2;
        const float mn = fmaxf(m, x);
        const float alpha = exp2f(m - mn), pw = exp2f(x - mn);
        l = l * alpha + pw;
#pragma unroll
        for (int k = 0; k < 8; ++k)
          if (lane + 32 * k < D) o[k] = o[k] * alpha + pw * to_float(V[int64_t(j) * D + lane + 32 * k]);
        m = mn;
      }
    }
    const int64_t pi = (int64_t(kvh) * p.p_tok + it.pbase) * G + r;
#pragma unroll
    for (int k = 0; k < 8; ++k)
      if (lane + 32 * k < D) p.part_o[pi * D + lane + 32 * k] = o[k];
    if (lane == 0) {
      p.part_ml[pi * 2] = m;
      p.part_ml[pi * 2 + 1] = l;
    }
  }
}

// ---- merge: one warp per (packed row, query head) ----
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

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
  float M = -INFINITY;
  for (int i = b + int(threadIdx.x); i < e; i += 128) M = fmaxf(M, p.part_ml[((hb + p.row_parts[i]) * G + g) * 2]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, off));
  if (lane == 0) red_s[warp][0] = M;
  __syncthreads();
  M = fmaxf(fmaxf(red_s[0][0], red_s[1][0]), fmaxf(red_s[2][0], red_s[3][0]));
  const float base = M == -INFINITY ? 0.0f : M;
  float4 acc[2] = {make_float4(0.f, 0.f, 0.f, 0.f), make_float4(0.f, 0.f, 0.f, 0.f)};
  float L = 0.0f;
  for (int i0 = b + warp * 32; i0 < e; i0 += 128) {
    int pi = 0;  // this lane's partial (i0 + lane) and its weight; 0 past the end
    float w = 0.0f;
    if (i0 + lane < e) {
      pi = int((hb + p.row_parts[i0 + lane]) * G + g);
      const float mi = p.part_ml[int64_t(pi) * 2];
      w = mi == -INFINITY ? 0.0f : fast_exp2(mi - base);
      L += w * p.part_ml[int64_t(pi) * 2 + 1];
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
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) L += __shfl_xor_sync(0xffffffffu, L, off);
#pragma unroll
  for (int k = 0; k < 2; ++k)
    if (lane + 32 * k < D4) acc_s[warp][lane + 32 * k] = acc[k];
  if (lane == 0) red_s[warp][1] = L;
  __syncthreads();
  L = red_s[0][1] + red_s[1][1] + red_s[2][1] + red_s[3][1];
  const float inv = L > 0.0f ? 1.0f / L : 0.0f;
  T* out = static_cast<T*>(p.out) + idx * D;
  for (int c = int(threadIdx.x); c < D4; c += 128) {
    const float4 a = acc_s[0][c], b1 = acc_s[1][c], c2 = acc_s[2][c], d3 = acc_s[3][c];
    out[4 * c + 0] = from_float<T>((a.x + b1.x + c2.x + d3.x) * inv);
    out[4 * c + 1] = from_float<T>((a.y + b1.y + c2.y + d3.y) * inv);
    out[4 * c + 2] = from_float<T>((a.z + b1.z + c2.z + d3.z) * inv);
    out[4 * c + 3] = from_float<T>((a.w + b1.w + c2.w + d3.w) * inv);
  }
  if (p.lse && threadIdx.x == 0) p.lse[idx] = L > 0.0f ? (M + __log2f(L)) * 0.69314718055994531f : -INFINITY;
}

#ifndef CHUNKVALE_EMULATE
// Launchers (attention_f16.cu, attention_bf16.cu). Return the launch error.
cudaError_t launch_attention_f16(const AttnParams& p, int D, int n_items, cudaStream_t stream);
cudaError_t launch_attention_bf16(const AttnParams& p, int D, int n_items, cudaStream_t stream);
#endif

}  // namespace cuda
}  // namespace chunkvale
