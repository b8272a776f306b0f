// The CUDA eviction kernels (digest_kernels.cuh, the same source nvcc builds) run on the CPU
// through emulate.h and are compared with float64 references of the documented definitions:
// digests of random key tiles (every kind, fp16 and bf16, head dims 64-256, chunks 16-128,
// digest index != slot), then the bound of random query rows summed over each KV head's
// query heads (shared selection) and its largest over each KV head's query heads (per-KV-head
// selection, laid out per (request, KV head) run). No GPU needed.
#define CHUNKVALE_EMULATE 1
#include <algorithm>
#include <cmath>

#include <cstdio>
#include <random>
#include <vector>

#include "digest_kernels.cuh"
#include "top_k.h"
#include "check.h"

using namespace chunkvale;

namespace {



bool close(double got, double want, double scale, double rtol) {
  return std::fabs(got - want) <= rtol * (std::fabs(want) + scale) || (std::isnan(got) && std::isnan(want));
}

struct Case {
  int q_heads, kv_heads, D, C;
};

template <typename T>
void run_case(const Case& cs, int kind, std::mt19937& rng) {
  const int KV = cs.kv_heads, D = cs.D, C = cs.C, G = cs.q_heads / cs.kv_heads;
  const int slots = 7, chunks = 9, n = 5;  // n chunks digested, from shuffled slots
  std::normal_distribution<float> N(0.0f, 1.0f);
  const int64_t slot_stride = int64_t(2) * KV * C * D;
  std::vector<uint16_t> pool(size_t(slots) * slot_stride);
  for (auto& x : pool) x = float_to_bits_as<T>(N(rng) * 2.0f + 0.5f);
  std::vector<int32_t> chunk_ids = {8, 0, 3, 6, 1}, slot_ids = {2, 6, 0, 5, 3};
  std::vector<float> digests(size_t(chunks) * KV * 2 * D, std::nanf(""));  // poison

  cuda::DigestParams p;
  p.pool_layer = pool.data();
  p.digests_layer = digests.data();
  p.chunks = chunk_ids.data();
  p.slots = slot_ids.data();
  p.pool = PoolView::chunkvale_layout(KV, C, D);
  p.kv_heads = KV;
  p.C = C;
  p.D = D;
  p.kind = kind;
  cuda::emu::launch(dim3(unsigned(n), unsigned(KV)), cuda::kDigestThreads, 0, [&] { cuda::digest_kernel<T>(p); });

  for (int i = 0; i < n; ++i)
    for (int h = 0; h < KV; ++h) {
      const uint16_t* keys = pool.data() + int64_t(slot_ids[size_t(i)]) * slot_stride + int64_t(h) * C * D;
      std::vector<double> lo(size_t(D), 1e300), hi(size_t(D), -1e300), c(size_t(D), 0.0), e(size_t(D), 0.0);
      for (int j = 0; j < C; ++j)
        for (int d = 0; d < D; ++d) {
          const double x = bits_to_float_as<T>(keys[j * D + d]);
          lo[size_t(d)] = std::min(lo[size_t(d)], x);
          hi[size_t(d)] = std::max(hi[size_t(d)], x);
        }
      for (int d = 0; d < D; ++d) c[size_t(d)] = 0.5 * (lo[size_t(d)] + hi[size_t(d)]);
      double r2 = 0.0;
      for (int j = 0; j < C; ++j) {
        double s = 0.0;
        for (int d = 0; d < D; ++d) {
          const double x = bits_to_float_as<T>(keys[j * D + d]) - c[size_t(d)];
          e[size_t(d)] += std::fabs(x) / C;
          s += x * x;
        }
        r2 = std::max(r2, s);
      }
      const float* got = digests.data() + (size_t(chunk_ids[size_t(i)]) * KV + size_t(h)) * 2 * D;
      for (int d = 0; d < D; ++d) {
        double w0, w1;
        if (kind == cuda::kCuboidMax) {
          w0 = lo[size_t(d)];
          w1 = hi[size_t(d)];
        } else if (kind == cuda::kCuboidMean) {
          w0 = c[size_t(d)];
          w1 = e[size_t(d)];
        } else {
          w0 = c[size_t(d)];
          w1 = d == 0 ? std::sqrt(r2) : 0.0;
        }
        EXPECT(close(got[d], w0, 1e-6, 1e-6) && close(got[D + d], w1, 1e-6, 1e-5),
               "digest kind %d D%d C%d chunk %d head %d dim %d: got (%g, %g), want (%g, %g)", kind, D, C,
               chunk_ids[size_t(i)], h, d, got[d], got[D + d], w0, w1);
      }
    }
  // Undigested chunks stay untouched (still poison).
  for (int ch : {2, 4, 5, 7}) EXPECT(std::isnan(digests[size_t(ch) * KV * 2 * D]), "chunk %d was written", ch);

  // Scores: 3 query rows of 4, each request with its own candidates (repeats allowed).
  const int rows_total = 4;
  std::vector<uint16_t> q(size_t(rows_total) * cs.q_heads * D);
  for (auto& x : q) x = float_to_bits_as<T>(N(rng));
  std::vector<int32_t> rows = {3, 0, 2};
  std::vector<std::vector<int32_t>> cands = {{8, 0, 3, 6, 1}, {1, 1, 6}, {3}};
  std::vector<float> qsum(rows.size() * size_t(KV) * cuda::qsum_stride(D), std::nanf(""));
  cuda::ScorePrepParams pp;
  pp.q = q.data();
  pp.rows = rows.data();
  pp.qsum = qsum.data();
  pp.q_heads = cs.q_heads;
  pp.kv_heads = KV;
  pp.group = G;
  pp.D = D;
  pp.kind = kind;
  cuda::emu::launch(dim3(unsigned(rows.size()), unsigned(KV)), cuda::kDigestThreads, 0, [&] { cuda::score_prep_kernel<T>(pp); });
  std::vector<int32_t> creq, cchunk;
  for (size_t r = 0; r < cands.size(); ++r)
    for (int32_t c : cands[r]) {
      creq.push_back(int32_t(r));
      cchunk.push_back(c);
    }
  std::vector<float> scores(creq.size(), std::nanf(""));
  cuda::ScoreParams sp;
  sp.digests_layer = digests.data();
  sp.qsum = qsum.data();
  sp.cand_req = creq.data();
  sp.cand_chunk = cchunk.data();
  sp.scores = scores.data();
  sp.n = int64_t(creq.size());
  sp.kv_heads = KV;
  sp.D = D;
  sp.kind = kind;
  const unsigned blocks = unsigned((creq.size() + cuda::kScoreWarps - 1) / cuda::kScoreWarps);
  cuda::emu::launch(dim3(blocks), cuda::kScoreWarps * 32, 0, [&] { cuda::score_kernel(sp); });
  // Query head h's bound on a chunk in float64, and the sum of its terms' magnitudes (the scale
  // of float32's rounding).
  auto head_bound = [&](int row, int h, int32_t chunk) {
    const float* d0 = digests.data() + (size_t(chunk) * KV + size_t(h / G)) * 2 * D;
    const float* d1 = d0 + D;
    double want = 0.0, scale = 0.0, qq = 0.0;
    for (int d = 0; d < D; ++d) {
      const double x = bits_to_float_as<T>(q[(size_t(row) * cs.q_heads + size_t(h)) * D + size_t(d)]);
      qq += x * x;
      double t;
      if (kind == cuda::kCuboidMax)
        t = std::max(x * d0[d], x * d1[d]);
      else if (kind == cuda::kCuboidMean)
        t = x * d0[d] + std::fabs(x) * d1[d];
      else
        t = x * d0[d];
      want += t;
      scale += std::fabs(t);
    }
    if (kind == cuda::kSphere) {
      want += std::sqrt(qq) * d1[0];
      scale += std::sqrt(qq) * std::fabs(d1[0]);
    }
    return std::make_pair(want, scale);
  };
  for (size_t c = 0; c < creq.size(); ++c) {
    const int row = rows[size_t(creq[c])];
    double want = 0.0, scale = 0.0;
    for (int h = 0; h < cs.q_heads; ++h) {
      const auto [w, s] = head_bound(row, h, cchunk[c]);
      want += w;
      scale += s;
    }
    EXPECT(std::fabs(scores[c] - want) <= 1e-5 * scale + 1e-5,
           "score kind %d heads %d/%d D%d: candidate %zu (row %d, chunk %d) got %.7g want %.7g", kind, cs.q_heads,
           KV, D, c, row, cchunk[c], scores[c], want);
  }

  // Per-KV-head scores: each query head summarised alone (prep with group 1), then per
  // (candidate, KV head) the largest of its group's bounds, in (request, KV head) runs.
  std::vector<float> qheads(rows.size() * size_t(cs.q_heads) * cuda::qsum_stride(D), std::nanf(""));
  cuda::ScorePrepParams hp = pp;
  hp.qsum = qheads.data();
  hp.kv_heads = cs.q_heads;
  hp.group = 1;
  cuda::emu::launch(dim3(unsigned(rows.size()), unsigned(cs.q_heads)), cuda::kDigestThreads, 0,
                    [&] { cuda::score_prep_kernel<T>(hp); });
  std::vector<int32_t> req_off = {0};
  for (const auto& cl : cands) req_off.push_back(req_off.back() + int32_t(cl.size()));
  std::vector<float> hscores(creq.size() * size_t(KV), std::nanf(""));
  cuda::ScoreHeadsParams sh;
  static_cast<cuda::ScoreParams&>(sh) = sp;  // the same candidates, digests and kind
  sh.qsum = qheads.data();
  sh.scores = hscores.data();
  sh.req_off = req_off.data();
  sh.group = G;
  const unsigned hblocks = unsigned((creq.size() * size_t(KV) + cuda::kScoreWarps - 1) / cuda::kScoreWarps);
  cuda::emu::launch(dim3(hblocks), cuda::kScoreWarps * 32, 0, [&] { cuda::score_heads_kernel(sh); });
  for (size_t c = 0; c < creq.size(); ++c) {
    const int32_t r = creq[c], o = req_off[size_t(r)], n_r = req_off[size_t(r) + 1] - o;
    for (int g = 0; g < KV; ++g) {
      double want = -1e300, scale = 0.0;
      for (int h = g * G; h < (g + 1) * G; ++h) {
        const auto [w, s] = head_bound(rows[size_t(r)], h, cchunk[c]);
        want = std::max(want, w);
        scale = std::max(scale, s);
      }
      const float got = hscores[size_t(o) * KV + size_t(g) * size_t(n_r) + (c - size_t(o))];
      EXPECT(std::fabs(got - want) <= 1e-5 * scale + 1e-5,
             "per-head score kind %d heads %d/%d D%d: candidate %zu (row %d, chunk %d) head %d got %.7g want %.7g",
             kind, cs.q_heads, KV, D, c, rows[size_t(r)], cchunk[c], g, got, want);
    }
  }
}

// The device top-k against the host rule (top_k.h): same indices, same order, with ties
// (repeated scores), negative and zero scores, and k from 1 to more than n.
void run_topk(std::mt19937& rng) {
  const std::vector<int> sizes = {1, 5, 31, 509, 700};
  std::vector<float> scores;
  std::vector<int32_t> off = {0};
  for (int n : sizes) {
    for (int c = 0; c < n; ++c) {
      float v = float(int(rng() % 41) - 20) * 0.25f;  // few distinct values: many ties
      if (rng() % 7 == 0) v = -0.0f;
      scores.push_back(v);
    }
    off.push_back(int32_t(scores.size()));
  }
  for (int k : {1, 3, 20, 40, 800}) {
    std::vector<int32_t> top(sizes.size() * size_t(k), -7);
    cuda::TopKParams p;
    p.scores = scores.data();
    p.req_off = off.data();
    p.top = top.data();
    p.k = k;
    cuda::emu::launch(dim3(unsigned(sizes.size())), cuda::kTopKThreads, 0, [&] { cuda::topk_kernel(p); });
    std::vector<uint64_t> heap;
    for (size_t r = 0; r < sizes.size(); ++r) {
      const size_t n = size_t(sizes[r]), m = std::min<size_t>(size_t(k), n);
      std::vector<int32_t> want(m);
      top_k(scores.data() + off[r], n, size_t(k), want.data(), heap);
      for (size_t j = 0; j < m; ++j)
        EXPECT(top[r * size_t(k) + j] == want[j], "top-k n=%zu k=%d position %zu: got %d want %d", n, k, j,
               top[r * size_t(k) + j], want[j]);
      for (size_t j = m; j < size_t(k); ++j) EXPECT(top[r * size_t(k) + j] == -7, "top-k wrote past min(k, n)");
    }
  }
}

}  // namespace

int main() {
  std::mt19937 rng(std::random_device{}());
  const Case cases[] = {{4, 2, 64, 16}, {32, 8, 128, 64}, {8, 8, 80, 32}, {16, 2, 256, 128}, {64, 1, 96, 16}};
  int ran = 0;
  for (const Case& cs : cases)
    for (int kind = 0; kind < 3; ++kind) {
      run_case<__half>(cs, kind, rng);
      run_case<__nv_bfloat16>(cs, kind, rng);
      ran += 2;
    }
  run_topk(rng);
  std::printf("digest/score/top-k emulation: %d cases, %d failures\n", ran + 1, failures());
  return failures() ? 1 : 0;
}
