// CpuBackend's digests: per (layer, slot, KV head) two float32 D-vectors summarising the
// chunk's keys; scoring itself is a kernel (attention_kernels.inc).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "chunkvale/errors.h"
#include "cpu_backend.h"
#include "top_k.h"

namespace chunkvale {

float* CpuBackend::digest(int layer, int32_t slot, int head) const {
  const DigestView dv{slots_, cfg_.kv_heads, cfg_.head_dim};
  return digests_.data() + dv.layer(layer) + dv.at(slot, head);
}

void CpuBackend::update_digests(int layer, const int32_t* chunks, const int32_t* slots, size_t n,
                                const ExecContext&) {
  const DigestKind kind = cfg_.eviction.digest;
  if (digests_.empty()) throw ValueError("eviction: digests are off for this cache");
  const int C = cfg_.chunk_size, D = cfg_.head_dim;
  std::vector<float> keys(size_t(C) * D);
  for (size_t i = 0; i < n; ++i) {
    for (int h = 0; h < cfg_.kv_heads; ++h) {
      read_tile(layer, slots[i], 0, h, keys.data());
      float* lo = digest(layer, chunks[i], h);
      float* hi = lo + D;
      for (int d = 0; d < D; ++d) {
        float mn = std::numeric_limits<float>::infinity(), mx = -mn;
        for (int j = 0; j < C; ++j) {
          mn = std::min(mn, keys[size_t(j) * D + d]);
          mx = std::max(mx, keys[size_t(j) * D + d]);
        }
        lo[d] = mn;
        hi[d] = mx;
      }
      if (kind == DigestKind::CuboidMax) continue;
      // Both other kinds are centred on the box centre.
      for (int d = 0; d < D; ++d) lo[d] = 0.5f * (lo[d] + hi[d]);
      if (kind == DigestKind::CuboidMean) {
        for (int d = 0; d < D; ++d) {
          double dev = 0.0;
          for (int j = 0; j < C; ++j) dev += std::fabs(keys[size_t(j) * D + d] - lo[d]);
          hi[d] = float(dev / C);
        }
      } else {  // sphere: radius in hi[0], the rest zero
        double r2 = 0.0;
        for (int j = 0; j < C; ++j) {
          double s = 0.0;
          for (int d = 0; d < D; ++d) {
            double x = keys[size_t(j) * D + d] - lo[d];
            s += x * x;
          }
          r2 = std::max(r2, s);
        }
        std::fill(hi, hi + D, 0.0f);
        hi[0] = float(std::sqrt(r2));
      }
    }
  }
}

void CpuBackend::top_chunks(int layer, const TensorView& q, const ScoreRequest* requests, size_t count, int k,
                            const ExecContext&) {
  size_t total = 0;
  for (size_t r = 0; r < count; ++r) total += requests[r].n;
  scores_.resize(total);
  score_chunks(layer, q, requests, count, scores_.data());
  for (size_t r = 0, off = 0; r < count; off += requests[r].n, ++r)
    top_k(scores_.data() + off, requests[r].n, size_t(std::max(k, 0)), requests[r].top, heap_);
}

void CpuBackend::score_chunks(int layer, const TensorView& q, const ScoreRequest* requests, size_t count,
                              float* scores) {
  const DigestKind kind = cfg_.eviction.digest;
  std::vector<size_t> first(count + 1, 0);  // each request's first score
  for (size_t r = 0; r < count; ++r) first[r + 1] = first[r] + requests[r].n;
  if (digests_.empty()) throw ValueError("eviction: digests are off for this cache");
  // Pieces of at most kPiece chunks, so one long sequence still spreads over the threads;
  // reading digests is memory-bound.
  constexpr size_t kPiece = 128;
  score_items_.clear();
  for (size_t r = 0; r < count; ++r)
    for (size_t c = 0; c < requests[r].n; c += kPiece) score_items_.emplace_back(r, c);
  const float* base = digest(layer, 0, 0);
  const size_t row_bytes = size_t(cfg_.q_heads) * cfg_.head_dim * elem_;
  attn_.threads().parallel_for(int64_t(score_items_.size()), [&](int64_t i, int t) {
    const ScoreRequest& req = requests[score_items_[size_t(i)].first];
    const size_t c0 = score_items_[size_t(i)].second;
    ScoreArgs a;
    a.digests = base;
    a.digest = DigestView{slots_, cfg_.kv_heads, cfg_.head_dim};
    a.D = cfg_.head_dim;
    a.kv_heads = cfg_.kv_heads;
    a.group = cfg_.group();
    a.q = static_cast<const uint8_t*>(q.data) + size_t(req.row) * row_bytes;
    a.slots = req.slots + c0;
    a.n = std::min(kPiece, req.n - c0);
    a.kind = kind;
    a.scores = scores + first[score_items_[size_t(i)].first] + c0;
    a.qf = score_q_[size_t(t)].data();
    attn_.kernels().score_chunks(a);
  });
}

void CpuBackend::read_digest(int layer, int32_t slot, int head, float* dst) const {
  if (digests_.empty()) throw ValueError("eviction: digests are off for this cache");
  const float* p = digest(layer, slot, head);
  std::copy(p, p + 2 * size_t(cfg_.head_dim), dst);
}

}  // namespace chunkvale
