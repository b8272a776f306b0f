// The headers the CPU kernels, the CUDA kernels and the emulator share
// (cpp/include/chunkvale/detail/): the pool view's offsets for chunkvale's and vLLM's block
// layouts, per-layer and digest offsets, the dtype conversions, and the online softmax with
// the exact merge of partials against a direct softmax.
#include <cmath>
#include <cstdio>
#include <vector>

#include "check.h"
#include "chunkvale/detail/dtype_convert.h"
#include "chunkvale/detail/pool_view.h"
#include "chunkvale/detail/softmax_state.h"

using namespace chunkvale;

namespace {

void pool_views() {
  const int H = 3, C = 16, D = 8;
  const PoolView cv = PoolView::chunkvale_layout(H, C, D);
  const PoolView vl = PoolView::vllm_cpu_layout(H, C, D);
  for (int s = 0; s < 4; ++s)
    for (int kv = 0; kv < 2; ++kv)
      for (int h = 0; h < H; ++h)
        for (int r = 0; r < C; ++r) {
          // chunkvale: [slots][2][kv_heads][C][D]
          EXPECT(cv.row(s, kv, h, r) == ((((int64_t(s) * 2 + kv) * H + h) * C + r) * D), "chunkvale s%d kv%d h%d r%d",
                 s, kv, h, r);
          // vLLM's CPU cache: [blocks][kv_heads][2 * block_size][D], K rows then V rows.
          EXPECT(vl.row(s, kv, h, r) == (((int64_t(s) * H + h) * 2 * C + kv * C + r) * D), "vllm s%d kv%d h%d r%d", s,
                 kv, h, r);
        }
  CHECK(cv.slot_elems() == 2 * H * C * D && vl.slot_elems() == 2 * H * C * D);
  std::vector<float> base(size_t(cv.slot_elems()) * 2);
  CHECK(cv.v_tile(base.data(), 1, 2) == base.data() + cv.tile(1, 1, 2));
  CHECK(cv.k_tile(base.data(), 1, 2) == base.data() + cv.tile(1, 0, 2));

  std::vector<size_t> off;
  const int slots[] = {5, 2, 7};
  layer_offsets(3, 10, [&](int l) { return slots[l]; }, off);
  CHECK((off == std::vector<size_t>{0, 50, 70, 140}));

  const DigestView dv{6, H, D};  // [layers][chunks][kv_heads][2][D]
  CHECK(dv.layer(2) + dv.at(4, 1) == ((int64_t(2) * 6 + 4) * H + 1) * 2 * D);
}

void dtypes() {
  CHECK(bf16_to_float(0x3F80) == 1.0f);
  CHECK(bf16_to_float(0xC040) == -3.0f);
  CHECK(float_to_bf16(1.0f) == 0x3F80);
  CHECK(float_to_bf16(1.0f + 0x1p-8f) == 0x3F80);         // halfway: to even
  CHECK(float_to_bf16(1.0f + 3 * 0x1p-8f) == 0x3F82);     // halfway: to even (up)
  CHECK(float_to_bf16(1.0f + 0x1p-8f + 0x1p-12f) == 0x3F81);  // past halfway: up
  CHECK(std::isnan(bf16_to_float(float_to_bf16(std::nanf("")))));
  CHECK(float_to_bf16(-INFINITY) == 0xFF80);
  CHECK(f16_to_float(0x3C00) == 1.0f);
  CHECK(f16_to_float(0xC000) == -2.0f);
  CHECK(f16_to_float(0x0001) == 0x1p-24f);  // smallest subnormal
}

struct E {
  static float exp(float x) { return std::exp(x); }
  static float log(float x) { return std::log(x); }
  static constexpr float kToNatural = 1.0f;
};

// One row over 11 keys (scalar values v_j): blocks streamed through SoftmaxState, the keys
// split between two partials merged by PartialMerge, and an empty partial, against the
// direct softmax.
void softmax() {
  const float s[11] = {0.3f, -1.2f, 2.5f, 0.0f, 4.1f, -3.0f, 1.7f, 2.2f, -0.4f, 3.3f, 0.9f};
  const float v[11] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
  double mx = -INFINITY, sum = 0, num = 0;
  for (float x : s) mx = std::max(mx, double(x));
  for (int j = 0; j < 11; ++j) sum += std::exp(s[j] - mx), num += std::exp(s[j] - mx) * v[j];
  const double want_out = num / sum, want_lse = mx + std::log(sum);

  auto partial = [&](int b, int e, float& m, float& l, float& o) {  // keys [b, e) in blocks of 3
    SoftmaxState<float> st{neg_inf(), 0.0f};
    o = 0.0f;
    for (int j0 = b; j0 < e; j0 += 3) {
      float bm = neg_inf();
      for (int j = j0; j < std::min(e, j0 + 3); ++j) bm = std::max(bm, s[j]);
      const float alpha = st.move_max(bm, [](float x) { return std::exp(x); }, [](float a, float c) { return std::max(a, c); });
      float bs = 0.0f;
      o *= alpha;
      for (int j = j0; j < std::min(e, j0 + 3); ++j) {
        const float p = std::exp(s[j] - st.base());
        bs += p;
        o += p * v[j];
      }
      st.add(alpha, bs);
    }
    m = st.m;
    l = st.l;
  };
  float m[3], l[3], o[3];
  partial(0, 11, m[0], l[0], o[0]);
  EXPECT(std::fabs(o[0] / l[0] - want_out) < 1e-5 && std::fabs(m[0] + std::log(l[0]) - want_lse) < 1e-5,
         "one partial: out %g (want %g)", o[0] / l[0], want_out);
  partial(0, 5, m[0], l[0], o[0]);
  partial(5, 11, m[1], l[1], o[1]);
  partial(4, 4, m[2], l[2], o[2]);  // no key: m = -inf, l = 0
  CHECK(m[2] == neg_inf() && l[2] == 0.0f && o[2] == 0.0f);
  PartialMerge<E> mg;
  for (float mi : m) mg.see_max(mi);
  float acc = 0.0f;
  for (int i = 0; i < 3; ++i) acc += mg.add(m[i], l[i]) * o[i];
  EXPECT(std::fabs(acc * mg.inv_sum() - want_out) < 1e-5, "merged out %g, want %g", acc * mg.inv_sum(), want_out);
  EXPECT(std::fabs(mg.lse() - want_lse) < 1e-5, "merged lse %g, want %g", mg.lse(), want_lse);
  CHECK(mg.weight(neg_inf()) == 0.0f);

  PartialMerge<E> none;  // only empty partials: no output, lse -inf
  none.see_max(neg_inf());
  CHECK(none.add(neg_inf(), 0.0f) == 0.0f && none.inv_sum() == 0.0f && none.lse() == neg_inf());
  CHECK(softmax_base(neg_inf()) == 0.0f && softmax_base(2.5f) == 2.5f);
}

}  // namespace

int main() {
  pool_views();
  dtypes();
  softmax();
  std::printf("%s: %d failures\n", failures() ? "FAIL" : "ok", failures());
  return failures() ? 1 : 0;
}
