// Host check of the CUDA backend's device plan, no GPU needed: for random prefix trees,
// prefill/extend/decode steps, GQA groups and SM counts, the device plan (items, chunk
// splits, partial numbering, merge lists, append addressing) is executed by a plain host
// emulation of the GPU's attention + merge kernels and compared with the CPU backend's
// output for the same plan. Also checks that a length-only decode step changes only the
// trailing sections of the packed plan (what the backend copies to the device).
#include <cmath>

#include <cstdio>
#include <map>
#include <random>
#include <vector>

#include "chunkvale/kv_cache.h"
#include "device_plan.h"
#include "prefix_kv.h"
#include "check.h"
#include "tree_scenario.h"

using namespace chunkvale;

namespace {

int total_bumps = 0;

TensorView view3(std::vector<float>& v, int64_t rows, int64_t heads, int64_t dim) {
  return tensor_view(v.data(), DType::Float32, rows, heads, dim);
}

float kv_value(const std::vector<int32_t>& toks, size_t upto, int which, int i) {
  return prefix_kv_value(toks, upto, uint64_t(which), i);
}

struct Case {
  int q_heads, kv_heads, D, C, threshold, threads;
};

// Emulates attention_kernel (as reference_attention_kernel computes it) and merge_kernel.
void emulate(KVCache& cache, const StepPlan& plan, const CacheConfig& cfg, int sm_count,
             const std::vector<float>& q, std::vector<float>& out, std::vector<float>& lse) {
  const int G = cfg.group(), H = cfg.kv_heads, D = cfg.head_dim, Hq = cfg.q_heads;
  std::vector<int32_t> W;
  cuda::PlanLayout L;
  cuda::build_device_plan(plan, cuda::PlanBuildParams::for_cache(cfg, sm_count), W, L);
  const float scale_log2 = cfg.resolved_scale() * 1.4426950408889634f;
  const size_t P = size_t(L.p_tok) * G * H;
  std::vector<float> ml(P * 2, NAN), po(P * size_t(D), NAN);
  std::map<std::pair<int, int>, std::vector<float>> tiles;
  auto tile = [&](int slot, int kv, int h) -> const std::vector<float>& {
    auto& t = tiles[{slot, kv * 1000 + h}];
    if (t.empty()) {
      t.resize(size_t(cfg.chunk_size) * D);
      cache.read_tile(0, slot, kv, h, t.data());
    }
    return t;
  };
  for (int i = 0; i < L.n_items; ++i) {
    const int32_t* it = W.data() + L.items + int64_t(i) * 8;
    const int cb = it[0], ce = it[1], rb = it[2], n_tok = it[3], pbase = it[4], flags = it[5];
    const int wn = cuda::item_warps_n(flags);
    EXPECT(wn == 1 || wn == 2 || wn == 4, "warps_n %d", wn);
    EXPECT(n_tok * G <= 16 * (4 / wn), "item %d: %d stacked rows > tile of %d", i, n_tok * G, 16 * (4 / wn));
    EXPECT(cb <= ce && ce <= L.n_chunks && rb + n_tok <= L.n_unit_rows, "item %d ranges", i);
    const bool causal = flags & cuda::kItemCausal;
    for (int kvh = 0; kvh < H; ++kvh) {
      for (int r = 0; r < n_tok * G; ++r) {
        const int t = r / G, g = r % G;
        const int row = W[size_t(L.unit_rows + rb + t)];
        const int pos = W[size_t(L.positions + row)];
        const float* qv = q.data() + (size_t(row) * Hq + size_t(kvh) * G + g) * D;
        float m = -INFINITY, l = 0.0f;
        std::vector<float> o(size_t(D), 0.0f);
        for (int c = cb; c < ce; ++c) {
          const int slot = W[size_t(L.chunk_slot + c)], start = W[size_t(L.chunk_start + c)];
          const int valid = W[size_t(L.chunk_valid + c)];
          const auto& K = tile(slot, 0, kvh);
          const auto& V = tile(slot, 1, kvh);
          for (int j = 0; j < valid; ++j) {
            if (causal && start + j > pos) break;
            float dot = 0.0f;
            for (int d = 0; d < D; ++d) dot += qv[d] * K[size_t(j) * D + d];
            const float x = dot * scale_log2, mn = std::max(m, x);
            const float a = std::exp2(m - mn), pw = std::exp2(x - mn);
            l = l * a + pw;
            for (int d = 0; d < D; ++d) o[size_t(d)] = o[size_t(d)] * a + pw * V[size_t(j) * D + d];
            m = mn;
          }
        }
        const size_t pi = (size_t(kvh) * L.p_tok + pbase) * G + r;
        EXPECT(std::isnan(ml[pi * 2]), "partial %zu written twice", pi);
        ml[pi * 2] = m;
        ml[pi * 2 + 1] = l;
        for (int d = 0; d < D; ++d) po[pi * D + d] = o[size_t(d)];
      }
    }
  }
  out.assign(size_t(L.num_tokens) * Hq * D, NAN);
  lse.assign(size_t(L.num_tokens) * Hq, NAN);
  for (int row = 0; row < L.num_tokens; ++row) {
    const int b = W[size_t(L.row_off + row)], e = W[size_t(L.row_off + row + 1)];
    EXPECT(e > b, "row %d has no partials", row);
    for (int h = 0; h < Hq; ++h) {
      const int kvh = h / G, g = h % G;
      float M = -INFINITY;
      for (int i = b; i < e; ++i) {
        const size_t pi = (size_t(kvh) * L.p_tok + W[size_t(L.row_parts + i)]) * G + g;
        EXPECT(!std::isnan(ml[pi * 2]), "row %d reads unwritten partial %zu", row, pi);
        M = std::max(M, ml[pi * 2]);
      }
      float Lsum = 0.0f;
      std::vector<float> acc(size_t(D), 0.0f);
      for (int i = b; i < e; ++i) {
        const size_t pi = (size_t(kvh) * L.p_tok + W[size_t(L.row_parts + i)]) * G + g;
        if (ml[pi * 2] == -INFINITY) continue;
        const float w = std::exp2(ml[pi * 2] - M);
        Lsum += w * ml[pi * 2 + 1];
        for (int d = 0; d < D; ++d) acc[size_t(d)] += w * po[pi * D + d];
      }
      for (int d = 0; d < D; ++d) out[(size_t(row) * Hq + h) * D + d] = acc[size_t(d)] / Lsum;
      lse[size_t(row) * Hq + h] = (M + std::log2(Lsum)) * 0.69314718055994531f;
    }
  }
}

void run_case(const Case& cs, uint32_t seed) {
  CacheConfig cfg;
  cfg.layers = 1;
  cfg.q_heads = cs.q_heads;
  cfg.kv_heads = cs.kv_heads;
  cfg.head_dim = cs.D;
  cfg.chunk_size = cs.C;
  cfg.dtype = DType::Float32;
  cfg.capacity_chunks = 4096;
  cfg.threads = cs.threads;
  cfg.share_threshold = cs.threshold;
  KVCache cache(cfg);
  std::mt19937 rng(seed);
  test::TreeScenario tree{cache, rng, {}, {}, {}};
  std::vector<int32_t> prev_pack;
  cuda::PlanLayout prev_layout;
  int bumps = 0;

  auto step = [&](const std::vector<PlanEntry>& entries) {
    const auto before = cache.stats();
    Step st = cache.plan(entries);
    const bool bumped = cache.stats().plan_reuses > before.plan_reuses;
    const StepPlan& plan = cache.step_plan(st);
    const int T = plan.num_tokens, Hq = cfg.q_heads, H = cfg.kv_heads, D = cfg.head_dim;
    std::vector<float> k(size_t(T) * H * D), v(k.size()), q(size_t(T) * Hq * D), out(q.size()),
        lse(size_t(T) * Hq);
    for (int r = 0; r < T; ++r) {
      const auto& tk = tree.toks[plan.seqs[size_t(plan.row_seq[size_t(r)])].seq_id];
      const size_t pos = size_t(plan.positions[size_t(r)]);
      for (int i = 0; i < H * D; ++i) {
        k[size_t(r) * H * D + i] = kv_value(tk, pos, 0, i);
        v[size_t(r) * H * D + i] = kv_value(tk, pos, 1, i);
      }
    }
    std::normal_distribution<float> nd;
    for (auto& x : q) x = nd(rng);
    cache.append(0, st, view3(k, T, H, D), view3(v, T, H, D));
    TensorView lv = view3(lse, T, Hq, 1);
    lv.ndim = 2;
    cache.attention(0, st, view3(q, T, Hq, D), view3(out, T, Hq, D), &lv);

    // Append addressing the GPU uses: row_slot[r], offset positions[r] % C.
    std::vector<int32_t> W;
    cuda::PlanLayout L;
    cuda::build_device_plan(plan, cuda::PlanBuildParams::for_cache(cfg, 132), W, L);
    std::vector<float> t(size_t(cfg.chunk_size) * D);
    for (int r = 0; r < T; ++r) {
      cache.read_tile(0, W[size_t(L.row_slot + r)], 0, H - 1, t.data());
      const int off = W[size_t(L.positions + r)] % cfg.chunk_size;
      bool same = true;
      for (int d = 0; d < D; ++d) same &= t[size_t(off) * D + d] == k[(size_t(r) * H + H - 1) * D + d];
      EXPECT(same, "row %d: row_slot/positions do not address the appended key", r);
    }
    // A length-only decode step changes only the trailing (row_slot, chunk_valid, positions) words.
    if (bumped && !prev_pack.empty() && L == prev_layout) {
      ++bumps;
      size_t first = 0;
      while (first < W.size() && W[first] == prev_pack[first]) ++first;
      EXPECT(first >= size_t(L.row_slot), "bumped plan differs at word %zu, before the dynamic sections (%lld)",
             first, (long long)L.row_slot);
    }
    prev_pack = W;
    prev_layout = L;

    for (int sm : {1, 7, 132}) {
      std::vector<float> eo, el;
      emulate(cache, plan, cfg, sm, q, eo, el);
      double num = 0, den = 0, lerr = 0;
      for (size_t i = 0; i < out.size(); ++i) {
        num += double(eo[i] - out[i]) * (eo[i] - out[i]);
        den += double(out[i]) * out[i];
      }
      for (size_t i = 0; i < lse.size(); ++i) lerr = std::max(lerr, double(std::fabs(el[i] - lse[i])));
      const double rel = std::sqrt(num / std::max(den, 1e-30));
      EXPECT(rel < 1e-4 && lerr < 1e-3, "case q%d kv%d D%d C%d thr%d threads%d sm%d seed %u: rel %.3g lse %.3g",
             cs.q_heads, cs.kv_heads, cs.D, cs.C, cs.threshold, cs.threads, sm, seed, rel, lerr);
    }
  };

  tree.step = step;
  tree.random_tree(cs.C, 3, 6, 2 * cs.C);
  tree.decode_all(6);
  total_bumps += bumps;
}

}  // namespace

int main() {
  const Case cases[] = {{4, 4, 64, 16, 2, 1},  {8, 2, 64, 32, 1, 2},  {9, 3, 64, 16, 2, 4},
                        {8, 1, 64, 64, 2, 3},  {32, 8, 64, 16, 1, 8}, {16, 1, 64, 32, 1000, 2},
                        {4, 2, 128, 128, 2, 2}, {64, 1, 64, 16, 1, 2}};
  std::random_device rd;
  const uint32_t base = rd();
  int n = 0;
  for (const Case& cs : cases) run_case(cs, base + uint32_t(n++));
  std::printf("%s: %d failures (seed base %u); %d length-only decode steps checked\n", failures() ? "FAIL" : "ok",
              failures(), base, total_bumps);
  EXPECT(total_bumps > 0, "no decode step reused its plan: the diff check never ran");
  return failures() ? 1 : 0;
}
