// Two-phase-partition attention on the GPU: one kernel for every item of a step (chunk-
// first and sequence-first alike), then a merge kernel. See device_plan.h for items.
//
// Attention kernel, one CTA (4 warps) per (item, KV head):
//   * Q tile: the item's stacked rows (token row x query head of the GQA group, row-major
//     as t * group + g), up to 64, staged in shared memory as the cache dtype.
//   * K/V are addressed through the pool view (PoolView, pool_view.h); keys stream through shared memory in 16-key blocks (a 16 x D slab of one chunk's
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
// Merge kernel (merge_kernel.cuh): the row's partials by log-sum-exp. A fault finder
// with the same items and partials: attention_reference.cuh.
#pragma once
#include "device_plan.h"
#include "kernel_env.cuh"

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

// The online softmax of the GPU kernels runs in log2 units (scores pre-scaled by log2 e):
// exponentials are ex2, and an LSE turns natural at the end (softmax_state.h).
struct Log2Units {
  __device__ __forceinline__ float operator()(float x) const { return fast_exp2(x); }
  __device__ __forceinline__ static float exp(float x) { return fast_exp2(x); }
  __device__ __forceinline__ static float log(float x) { return __log2f(x); }
  static constexpr float kToNatural = 0.69314718055994531f;
};
struct FMax {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

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
  const PoolView& pool = p.pool;
  KeyCursor lc{it.chunk_begin, 0};
  cursor_skip_empty(lc, c_end, ch);
  KeyCursor cc = lc;

  auto load_stage = [&](int buf) {
    for (int b = 0; b < SB && lc.c < c_end; ++b) {
      const int nvalid = min(16, ch.valid(lc.c) - lc.kb);
      const T* kg = pool.k_tile(layer, ch.slot(lc.c), kvh) + int64_t(lc.kb) * D;
      const T* vg = pool.v_tile(layer, ch.slot(lc.c), kvh) + int64_t(lc.kb) * D;
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
  SoftmaxState<float> st0{-INFINITY, 0.0f}, st1{-INFINITY, 0.0f};  // rows lane/4 and lane/4 + 8
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
        const float al0 = st0.move_max(mx0, Log2Units{}, FMax{}), al1 = st1.move_max(mx1, Log2Units{}, FMax{});
        const float b0 = st0.base(), b1 = st1.base();
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
        st0.add(al0, s0);
        st1.add(al1, s1);
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
  float l0 = st0.l, l1 = st1.l;
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
      ml[r0 * 2] = st0.m;
      ml[r0 * 2 + 1] = l0;
      ml[(r0 + 8) * 2] = st1.m;
      ml[(r0 + 8) * 2 + 1] = l1;
    }
  }
  __syncthreads();
  const int64_t pbase = (int64_t(kvh) * p.p_tok + it.pbase) * G;
  for (int idx = tid; idx < real_rows * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    const int g0 = (r >> 4) * warps_n, lr = r & 15;
    PartialMerge<Log2Units> mg;  // the warps' partials of row r
    for (int w = 0; w < warps_n; ++w) mg.see_max(MLs[(g0 + w) * 32 + lr * 2]);
    float acc = 0.0f;
    for (int w = 0; w < warps_n; ++w)
      acc += mg.add(MLs[(g0 + w) * 32 + lr * 2], MLs[(g0 + w) * 32 + lr * 2 + 1]) * Os[((g0 + w) * 16 + lr) * LDO + d];
    p.part_o[(pbase + r) * D + d] = acc;
    if (d == 0) {
      p.part_ml[(pbase + r) * 2] = mg.M;
      p.part_ml[(pbase + r) * 2 + 1] = mg.L;
    }
  }
}

#ifndef CHUNKVALE_EMULATE
// Launchers (attention_f16.cu, attention_bf16.cu). Return the launch error.
cudaError_t launch_attention_f16(const AttnParams& p, int D, int n_items, cudaStream_t stream);
cudaError_t launch_attention_bf16(const AttnParams& p, int D, int n_items, cudaStream_t stream);
#endif

}  // namespace cuda
}  // namespace chunkvale

// The other kernels of a step, over the same items and partials.
#include "attention_reference.cuh"
#include "merge_kernel.cuh"
