#include "head_scores.h"

#include <cmath>

namespace chunkvale {

namespace {
// The digest bound of one query head against one (chunk, KV head) digest.
float bound(DigestKind kind, const float* q, const float* d0, const float* d1, int D) {
  float s = 0.0f;
  switch (kind) {
    case DigestKind::CuboidMax:  // d0 = min, d1 = max: max(q lo, q hi) per dim
      for (int d = 0; d < D; ++d) s += q[d] > 0.0f ? q[d] * d1[d] : q[d] * d0[d];
      return s;
    case DigestKind::CuboidMean:  // d0 = centre, d1 = mean deviation
      for (int d = 0; d < D; ++d) s += q[d] * d0[d] + std::fabs(q[d]) * d1[d];
      return s;
    case DigestKind::Sphere: {  // d0 = centre, d1[0] = radius
      float n2 = 0.0f;
      for (int d = 0; d < D; ++d) {
        s += q[d] * d0[d];
        n2 += q[d] * q[d];
      }
      return s + std::sqrt(n2) * d1[0];
    }
  }
  return s;
}
}  // namespace

void score_chunks_per_head(const ScoreArgs& a, const float* q, float* scores, size_t head_stride) {
  const int D = a.D, G = a.group;
  for (size_t c = 0; c < a.n; ++c) {
    for (int g = 0; g < a.kv_heads; ++g) {
      const float* d0 = a.digests + a.digest.at(a.slots[c], g);
      float best = -INFINITY;
      for (int h = g * G; h < (g + 1) * G; ++h) best = std::fmax(best, bound(a.kind, q + size_t(h) * D, d0, d0 + D, D));
      scores[size_t(g) * head_stride + c] = best;
    }
  }
}

}  // namespace chunkvale
