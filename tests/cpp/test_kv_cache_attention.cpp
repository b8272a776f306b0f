// End to end through the C++ API: shared prefixes, prefill + decode, GQA, against a
// dense double-precision reference; plus errors leaving the cache unchanged.
#include <cmath>
#include <map>
#include <random>
#include <vector>

#include "check.h"
#include "prefix_kv.h"
#include "chunkvale/kv_cache.h"

using namespace chunkvale;

namespace {

TensorView view3(std::vector<float>& v, int64_t rows, int64_t heads, int64_t dim) {
  return tensor_view(v.data(), DType::Float32, rows, heads, dim);
}

// K/V are a function of (token prefix, layer), as a model's would be.
float kv_value(const std::vector<int32_t>& toks, size_t upto, int layer, int which, int i) {
  return prefix_kv_value(toks, upto, uint64_t(layer * 31 + which), i);
}

struct Model {
  CacheConfig cfg;
  std::map<int64_t, std::vector<int32_t>> tokens;  // full token list per sequence
};

double run_step(KVCache& cache, Model& m, const std::vector<PlanEntry>& entries, std::mt19937& rng) {
  const auto& cfg = m.cfg;
  Step step = cache.plan(entries);
  const StepPlan& plan = cache.step_plan(step);
  const int T = plan.num_tokens, H = cfg.q_heads, KV = cfg.kv_heads, D = cfg.head_dim;
  std::normal_distribution<float> nd;
  double worst = 0.0;
  for (int l = 0; l < cfg.layers; ++l) {
    std::vector<float> k(size_t(T) * KV * D), v(k.size()), q(size_t(T) * H * D), out(q.size(), NAN);
    std::vector<float> lse(size_t(T) * H, NAN);
    for (int r = 0; r < T; ++r) {
      const auto& toks = m.tokens[plan.seqs[size_t(plan.row_seq[size_t(r)])].seq_id];
      size_t pos = size_t(plan.positions[size_t(r)]);
      for (int i = 0; i < KV * D; ++i) {
        k[size_t(r) * KV * D + i] = kv_value(toks, pos, l, 0, i);
        v[size_t(r) * KV * D + i] = kv_value(toks, pos, l, 1, i);
      }
    }
    for (auto& x : q) x = nd(rng);
    cache.append(l, step, view3(k, T, KV, D), view3(v, T, KV, D));
    TensorView lv;
    lv.data = lse.data();
    lv.ndim = 2;
    lv.shape[0] = T, lv.shape[1] = H;
    lv.strides[0] = H, lv.strides[1] = 1;
    cache.attention(l, step, view3(q, T, H, D), view3(out, T, H, D), &lv);
    for (int r = 0; r < T; ++r) {
      const auto& toks = m.tokens[plan.seqs[size_t(plan.row_seq[size_t(r)])].seq_id];
      size_t pos = size_t(plan.positions[size_t(r)]);
      for (int h = 0; h < H; ++h) {
        int g = h / (H / KV);
        std::vector<double> s(pos + 1);
        double mx = -1e300;
        for (size_t j = 0; j <= pos; ++j) {
          double acc = 0;
          for (int d = 0; d < D; ++d)
            acc += double(q[(size_t(r) * H + h) * D + d]) * kv_value(toks, j, l, 0, g * D + d);
          s[j] = acc * cfg.resolved_scale();
          mx = std::max(mx, s[j]);
        }
        double sum = 0;
        for (auto& x : s) sum += (x = std::exp(x - mx));
        for (int d = 0; d < D; ++d) {
          double o = 0;
          for (size_t j = 0; j <= pos; ++j) o += s[j] * kv_value(toks, j, l, 1, g * D + d);
          o /= sum;
          worst = std::max(worst, std::fabs(o - out[(size_t(r) * H + h) * D + d]));
        }
        worst = std::max(worst, std::fabs(mx + std::log(sum) - lse[size_t(r) * H + h]));
        if (std::isnan(out[(size_t(r) * H + h) * D])) worst = 1e9;
      }
    }
  }
  return worst;
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  for (int C : {16, 32}) {
    Model m;
    m.cfg.layers = 2;
    m.cfg.q_heads = 6;
    m.cfg.kv_heads = 2;
    m.cfg.head_dim = 64;
    m.cfg.chunk_size = C;
    m.cfg.capacity_chunks = 64;
    m.cfg.threads = 2;
    KVCache cache(m.cfg);

    std::vector<int32_t> prefix(50);
    for (size_t i = 0; i < prefix.size(); ++i) prefix[i] = int32_t(100 + i);
    // First request: prefill, its full chunks become cached prefix.
    auto p1 = prefix;
    p1.push_back(7);
    auto [s1, c1] = cache.add_sequence(p1);
    CHECK(c1 == 0);
    m.tokens[s1] = p1;
    CHECK(run_step(cache, m, {{s1, int64_t(p1.size()), {}}}, rng) < 1e-4);

    // Two more share it: full chunks reused, the rest copied on divergence.
    auto p2 = prefix, p3 = prefix;
    p2.push_back(8);
    p3.resize(40);
    p3.push_back(9);
    auto [s2, c2] = cache.add_sequence(p2);
    auto [s3, c3] = cache.add_sequence(p3);
    // Full chunks are shared; the rest (from a cached chunk or s1's live tail) is copied.
    CHECK(c2 == 50);  // everything but the diverging token
    CHECK(c3 == 40);
    CHECK(cache.stats().chunks_shared == 50 / C);
    m.tokens[s2] = p2;
    m.tokens[s3] = p3;
    m.tokens[s1].push_back(3);
    CHECK(run_step(cache, m, {{s2, int64_t(p2.size()) - c2, {}}, {s3, int64_t(p3.size()) - c3, {}}, {s1, 0, {3}}}, rng) < 1e-4);
    for (int t = 0; t < 20; ++t) {  // decode across chunk boundaries, batch order shuffled
      std::vector<PlanEntry> e;
      for (int64_t s : {s3, s1, s2}) {
        int32_t tok = int32_t(rng() % 1000);
        m.tokens[s].push_back(tok);
        e.push_back({s, 0, {tok}});
      }
      if (t < 10 && t % 2) std::swap(e[0], e[2]);  // then a steady batch: lazy reuse
      CHECK(run_step(cache, m, e, rng) < 1e-4);
    }
    CacheStats st = cache.stats();
    CHECK(st.chunks_shared >= 1);
    CHECK(st.plan_reuses > 0 && st.plan_rebuilds > 0);

    // Errors: unknown id, bad shapes, stale step; the cache is left as it was.
    CHECK_THROWS(cache.remove(999), KeyError, "unknown sequence id 999");
    CHECK_THROWS(cache.plan({{s1, 5, {}}}), ValueError, "n_new");
    CHECK(cache.stats().chunks_in_use == st.chunks_in_use);
    Step step = cache.plan({{s1, 0, {1}}});
    std::vector<float> bad(10);
    CHECK_THROWS(cache.append(0, step, view3(bad, 2, 2, 64), view3(bad, 2, 2, 64)), ValueError,
                 "expected shape [1, 2, 64]");
    CHECK_THROWS(cache.append(0, Step{}, view3(bad, 1, 2, 64), view3(bad, 1, 2, 64)), ValueError,
                 "expected the open step");
    CHECK_THROWS(cache.remove(s1), ValueError, "still open");
    cache.cancel(step);
    CHECK(cache.stats().chunks_in_use == st.chunks_in_use);

    // Removing everything and clearing returns the pool to empty.
    for (int64_t s : {s1, s2, s3}) cache.remove(s);
    CHECK(cache.stats().chunks_cached > 0);
    cache.clear();
    CHECK(cache.stats().chunks_in_use == 0);

    // Capacity: a prompt that cannot fit raises CapacityError and changes nothing.
    std::vector<int32_t> huge(size_t(C) * 70, 1);
    auto [sh, ch] = cache.add_sequence(huge);
    CHECK(ch == 0);
    CHECK_THROWS(cache.plan({{sh, int64_t(huge.size()), {}}}), CapacityError, "needs 70 free chunks");
    CHECK(cache.stats().chunks_in_use == 0);
  }
  return finish("kv_cache_attention");
}
