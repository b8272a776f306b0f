#include "key_digest.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace chunkvale {

void key_digest(DigestKind kind, const float* keys, int rows, int D, float* lo, float* hi) {
  for (int d = 0; d < D; ++d) {
    float mn = std::numeric_limits<float>::infinity(), mx = -mn;
    for (int j = 0; j < rows; ++j) {
      mn = std::min(mn, keys[size_t(j) * D + d]);
      mx = std::max(mx, keys[size_t(j) * D + d]);
    }
    lo[d] = mn;
    hi[d] = mx;
  }
  if (kind == DigestKind::CuboidMax) return;
  // Both other kinds are centred on the box centre.
  for (int d = 0; d < D; ++d) lo[d] = 0.5f * (lo[d] + hi[d]);
  if (kind == DigestKind::CuboidMean) {
    for (int d = 0; d < D; ++d) {
      double dev = 0.0;
      for (int j = 0; j < rows; ++j) dev += std::fabs(keys[size_t(j) * D + d] - lo[d]);
      hi[d] = float(dev / rows);
    }
    return;
  }
  // Sphere: the radius in hi[0], the rest zero.
  double r2 = 0.0;
  for (int j = 0; j < rows; ++j) {
    double s = 0.0;
    for (int d = 0; d < D; ++d) {
      const double x = keys[size_t(j) * D + d] - lo[d];
      s += x * x;
    }
    r2 = std::max(r2, s);
  }
  std::fill(hi, hi + D, 0.0f);
  hi[0] = float(std::sqrt(r2));
}

}  // namespace chunkvale
