// Host emulation of the CUDA features attention_kernels.cuh uses, so the *same kernel
// source* runs on a CPU (test_kernel_emulation.cpp; no GPU needed). Each CTA runs as 128
// cooperative fibers (ucontext) on one OS thread; __syncthreads, warp shuffles, ldmatrix
// and mma.sync are collectives implemented from the PTX ISA's fragment layouts; cp.async
// copies are queued per thread and done at cp.async.wait_group, as late as the hardware
// may do them. What it checks: index arithmetic, fragment layouts (as this file reads the
// ISA), pipeline order, masking, warp combine. What it cannot: timing, real asynchrony,
// alignment faults, the compiler's code. Compiled only with CHUNKVALE_EMULATE (g++).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <ucontext.h>
#include <vector_types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <vector>

#include "chunkvale/detail/dtype_convert.h"

#undef __shared__
#define __shared__ static  // one CTA runs at a time: a static is shared by its fibers
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#define __log2f log2f

namespace chunkvale {
namespace cuda {
namespace emu {

struct Copy {
  void* dst;
  const void* src;
  bool full;
};

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  std::vector<Copy> open;                  // cp.async not yet committed
  std::vector<std::vector<Copy>> groups;   // committed, not yet waited for
};

struct State {
  int n = 0, cur = 0;
  uint3 block{0, 0, 0}, grid{1, 1, 1};
  std::vector<Fiber> f;
  ucontext_t main;
  std::function<void()> body;
  int cta_arrived = 0;
  unsigned cta_gen = 0;
  int warp_arrived[32] = {};
  unsigned warp_gen[32] = {};
  unsigned char xch[32][32][64];  // per warp, per lane: exchange slots
  std::vector<unsigned char> smem;
};
inline State& st() {
  static State s;
  return s;
}

inline void yield() {
  State& s = st();
  swapcontext(&s.f[size_t(s.cur)].ctx, &s.main);
}

struct Idx {
  unsigned x, y, z;
};
inline Idx thread_idx() { return {unsigned(st().cur), 0u, 0u}; }
inline Idx block_idx() { return {st().block.x, st().block.y, st().block.z}; }
inline Idx block_dim() { return {unsigned(st().n), 1u, 1u}; }
inline Idx grid_dim() { return {st().grid.x, st().grid.y, st().grid.z}; }

inline void syncthreads() {
  State& s = st();
  const unsigned gen = s.cta_gen;
  if (++s.cta_arrived == s.n) {
    s.cta_arrived = 0;
    ++s.cta_gen;
  } else {
    while (s.cta_gen == gen) yield();
  }
}
inline void syncwarp() {
  State& s = st();
  const int w = s.cur / 32;
  const unsigned gen = s.warp_gen[w];
  if (++s.warp_arrived[w] == 32) {
    s.warp_arrived[w] = 0;
    ++s.warp_gen[w];
  } else {
    while (s.warp_gen[w] == gen) yield();
  }
}
inline unsigned char* slot(int lane) { return st().xch[st().cur / 32][lane]; }
inline int lane() { return st().cur & 31; }

inline unsigned char* dynamic_smem() { return st().smem.data(); }

// Runs `body` as every thread of every CTA of `grid` (threads per CTA: `n`).
inline void launch(dim3 grid, int n, size_t smem_bytes, std::function<void()> body) {
  State& s = st();
  s.n = n;
  s.grid = {grid.x, grid.y, grid.z};
  s.body = std::move(body);
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      s.block = {bx, by, 0};
      s.smem.assign(smem_bytes + 128, 0xA5);  // poisoned, like uninitialised shared memory
      s.f.assign(size_t(n), Fiber{});
      s.cta_arrived = 0;
      std::fill(std::begin(s.warp_arrived), std::end(s.warp_arrived), 0);
      for (int t = 0; t < n; ++t) {
        Fiber& f = s.f[size_t(t)];
        f.stack.resize(256 * 1024);
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = &s.main;
        makecontext(&f.ctx, reinterpret_cast<void (*)()>(+[] {
                      State& s2 = st();
                      s2.body();
                      s2.f[size_t(s2.cur)].done = true;
                    }),
                    0);
      }
      for (bool any = true; any;) {
        any = false;
        for (int t = 0; t < n; ++t) {
          if (s.f[size_t(t)].done) continue;
          any = true;
          s.cur = t;
          swapcontext(&s.main, &s.f[size_t(t)].ctx);
        }
      }
      for (const Fiber& f : s.f)
        if (!f.groups.empty() || !f.open.empty()) throw std::logic_error("emulation: cp.async left pending at exit");
    }
}

}  // namespace emu

#define threadIdx (::chunkvale::cuda::emu::thread_idx())
#define blockIdx (::chunkvale::cuda::emu::block_idx())
#define blockDim (::chunkvale::cuda::emu::block_dim())
#define gridDim (::chunkvale::cuda::emu::grid_dim())
inline void __syncthreads() { emu::syncthreads(); }

namespace emu {
// Every lane publishes v, then reads lane src's (src computed per lane).
template <typename V>
inline V exchange(V v, int src) {
  static_assert(sizeof(V) <= 64, "");
  std::memcpy(slot(lane()), &v, sizeof(V));
  syncwarp();
  V r;
  std::memcpy(&r, slot(src & 31), sizeof(V));
  syncwarp();
  return r;
}
}  // namespace emu
template <typename V>
inline V __shfl_xor_sync(unsigned, V v, int mask) { return emu::exchange(v, emu::lane() ^ mask); }
template <typename V>
inline V __shfl_sync(unsigned, V v, int src) { return emu::exchange(v, src); }

using std::max;
using std::min;

// ldmatrix.m8n8.x4(.trans).b16: lanes 8i..8i+7 give the row addresses of matrix i. Without
// .trans lane T receives row T/4, elements 2(T%4), 2(T%4)+1; with .trans it receives
// elements (row 2(T%4), col T/4) and (row 2(T%4)+1, col T/4).
inline void ldmatrix_impl(uint32_t (&r)[4], const void* p, bool trans) {
  const uint16_t* mine = static_cast<const uint16_t*>(p);
  std::memcpy(emu::slot(emu::lane()), &mine, sizeof(mine));
  emu::syncwarp();
  const int T = emu::lane();
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    auto row = [&](int k) {
      const uint16_t* q;
      std::memcpy(&q, emu::slot(8 * i + k), sizeof(q));
      return q;
    };
    if (!trans) {
      lo = row(T / 4)[2 * (T % 4)];
      hi = row(T / 4)[2 * (T % 4) + 1];
    } else {
      lo = row(2 * (T % 4))[T / 4];
      hi = row(2 * (T % 4) + 1)[T / 4];
    }
    r[i] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
  emu::syncwarp();
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { ldmatrix_impl(r, p, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { ldmatrix_impl(r, p, true); }

inline void cp_async16(void* smem, const void* gmem, bool full) {
  emu::st().f[size_t(emu::st().cur)].open.push_back({smem, gmem, full});
}
inline void cp_async_commit() {
  emu::Fiber& f = emu::st().f[size_t(emu::st().cur)];
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}
template <int N>
inline void cp_async_wait() {
  emu::Fiber& f = emu::st().f[size_t(emu::st().cur)];
  while (int(f.groups.size()) > N) {
    for (const emu::Copy& c : f.groups.front()) {
      if (c.full)
        std::memcpy(c.dst, c.src, 16);
      else
        std::memset(c.dst, 0, 16);
    }
    f.groups.erase(f.groups.begin());
  }
}

inline float fast_exp2(float x) { return std::exp2(x); }

inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}

// mma.sync.m16n8k16.row.col.f32.{f16,bf16}: groupID g = lane/4, t = lane%4.
// A: a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..).
// B: b0 (k = 2t..2t+1, n = g), b1 (k = 2t+8.., n = g).  C/D: c0,c1 (g, 2t..), c2,c3 (g+8, 2t..).
template <typename T>
struct Mma {
  static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    struct Frag {
      uint32_t a[4], b[2];
    } mine{{a[0], a[1], a[2], a[3]}, {b0, b1}};
    std::memcpy(emu::slot(emu::lane()), &mine, sizeof(mine));
    emu::syncwarp();
    float A[16][16], B[16][8];
    for (int L = 0; L < 32; ++L) {
      Frag fr;
      std::memcpy(&fr, emu::slot(L), sizeof(fr));
      const int g = L / 4, t = L % 4;
      auto put_a = [&](uint32_t w, int r, int k) {
        A[r][k] = bits_to_float_as<T>(uint16_t(w & 0xffff));
        A[r][k + 1] = bits_to_float_as<T>(uint16_t(w >> 16));
      };
      put_a(fr.a[0], g, 2 * t);
      put_a(fr.a[1], g + 8, 2 * t);
      put_a(fr.a[2], g, 2 * t + 8);
      put_a(fr.a[3], g + 8, 2 * t + 8);
      B[2 * t][g] = bits_to_float_as<T>(uint16_t(fr.b[0] & 0xffff));
      B[2 * t + 1][g] = bits_to_float_as<T>(uint16_t(fr.b[0] >> 16));
      B[2 * t + 8][g] = bits_to_float_as<T>(uint16_t(fr.b[1] & 0xffff));
      B[2 * t + 9][g] = bits_to_float_as<T>(uint16_t(fr.b[1] >> 16));
    }
    emu::syncwarp();
    const int g = emu::lane() / 4, t = emu::lane() % 4;
    for (int e = 0; e < 4; ++e) {
      const int r = g + (e >= 2 ? 8 : 0), n = 2 * t + (e & 1);
      float acc = c[e];
      for (int k = 0; k < 16; ++k) acc += A[r][k] * B[k][n];
      c[e] = acc;
    }
  }
  static uint32_t pack(float lo, float hi) {
    return uint32_t(float_to_bits_as<T>(lo)) | (uint32_t(float_to_bits_as<T>(hi)) << 16);
  }
};

}  // namespace cuda
}  // namespace chunkvale
