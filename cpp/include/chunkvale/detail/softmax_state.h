// Online softmax and the exact merge of softmax partials (in the spirit of FlashInfer's
// state.cuh), shared by the CPU kernels, the CUDA kernels and the emulator. The rules live
// here; the exponential is the caller's (Base::exp: e^x on the CPU, 2^x on the GPU, which
// keeps its scores in log2 units), and so is the value type for the running state (a float,
// or on the CPU a vector of rows in lanes).
//
// A partial of a row over some keys is (m, l, o): the max score m, l = sum exp(s - m) and
// the unnormalised output o = sum exp(s - m) v. A row that saw no key has m = -inf, l = 0.
#pragma once

#include "chunkvale/detail/host_device.h"

namespace chunkvale {

CHUNKVALE_HD float neg_inf() { return -__builtin_huge_valf(); }

// What scores are exponentiated against when the running max is m: m itself, or 0 while
// nothing was seen (exp(-inf - -inf) would be NaN; exp(-inf - 0) is 0, as it should be).
template <class V>
CHUNKVALE_HD V softmax_base(V m) {
  return m == neg_inf() ? V{} : m;
}

// The running (m, l) of one row (or one vector of rows) while key blocks stream past.
// Per block: alpha = move_max(block max) scales the running output, the block's
// probabilities are exp(s - base()), then add(alpha, their sum).
template <class V>
struct SoftmaxState {
  V m, l;
  template <class Exp, class Max>
  CHUNKVALE_HD V move_max(V block_max, Exp exp_fn, Max max_fn) {
    const V m_new = max_fn(m, block_max);
    const V alpha = exp_fn(m - softmax_base(m_new));  // 0 when m was -inf
    m = m_new;
    return alpha;
  }
  CHUNKVALE_HD V base() const { return softmax_base(m); }
  CHUNKVALE_HD void add(V alpha, V block_sum) { l = l * alpha + block_sum; }
};

// Merging partials of one row by log-sum-exp: pass 1 sees every partial's max, pass 2
// weighs each by exp(m_i - M) (0 for a partial that saw nothing) and sums the l_i; the
// merged output is sum w_i o_i * inv_sum(), its log-sum-exp lse(). Base supplies exp, log
// and the factor that turns its log into a natural log.
template <class Base>
struct PartialMerge {
  float M = neg_inf(), L = 0.0f;
  CHUNKVALE_HD void see_max(float mi) {
#if defined(__CUDA_ARCH__)
    M = fmaxf(M, mi);
#else
    M = M < mi ? mi : M;  // std::max
#endif
  }
  CHUNKVALE_HD float weight(float mi) const { return mi == neg_inf() ? 0.0f : Base::exp(mi - softmax_base(M)); }
  // Adds a partial's sum; returns its weight for the caller's output accumulation.
  CHUNKVALE_HD float add(float mi, float li) {
    const float w = weight(mi);
    L += w * li;
    return w;
  }
  CHUNKVALE_HD float inv_sum() const { return L > 0.0f ? 1.0f / L : 0.0f; }
  // The natural-log LSE of the row (-inf when no partial saw a key).
  CHUNKVALE_HD float lse() const { return L > 0.0f ? (M + Base::log(L)) * Base::kToNatural : neg_inf(); }
};

}  // namespace chunkvale
