// The CUDA attention + merge kernels (attention_kernels.cuh, the same source nvcc builds)
// run on the CPU through emulate.h, on the device plan of real steps (random prefix
// trees; prefill, extend, decode; GQA; chunk sizes; fp16 and bf16), compared with the CPU
// backend's output for the same K/V and queries. No GPU needed; see emulate.h for what
// this does and does not prove.
//
// Two sweeps over the same cases (every kernel — append, mma attention, reference attention,
// merge, copy_chunk — for fp16 and bf16, head dims 64/80/128/256, every pipeline shape, GQA and
// MQA, split and unsplit sequence-first): the default one, for CI, builds smaller random trees
// per case (fewer and shorter sequences, fewer decode steps); CHUNKVALE_FULL_EMULATION=1 (or
// argument --full) runs the full one.
#define CHUNKVALE_EMULATE 1
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <map>
#include <random>
#include <vector>

#include "attention_kernels.cuh"
#include "chunkvale/kv_cache.h"
#include "pool_kernels.cuh"
#include "prefix_kv.h"
#include "check.h"
#include "tree_scenario.h"

using namespace chunkvale;
using chunkvale::cuda::AttnShape;

namespace {


template <typename T>
uint16_t bits_of(float x) {
  return float_to_bits_as<T>(x);
}
template <typename T>
float float_of(uint16_t b) {
  return bits_to_float_as<T>(b);
}

TensorView view3(std::vector<uint16_t>& v, DType dt, int64_t rows, int64_t heads, int64_t dim) {
  return tensor_view(v.data(), dt, rows, heads, dim);
}

float kv_value(const std::vector<int32_t>& toks, size_t upto, int which, int i) {
  return prefix_kv_value(toks, upto, uint64_t(which), i);
}

struct Case {
  int q_heads, kv_heads, D, C, threshold, sm_count;
  bool bf16;
};

// Which kernel paths the sweep reached (counted on the mma runs): every tile layout (warps
// splitting the keys 4 / 2 / 1 ways), causal and non-causal (chunk-first) items, split items,
// and rows merged from several partials. main() fails the fast sweep if one was never taken.
struct Coverage {
  int64_t warps_n[5] = {};
  int64_t causal = 0, non_causal = 0, merged_rows = 0, split_items = 0;
  int64_t per_head_runs = 0;  // steps also run one KV head at a time (restrict_to_head)
};
Coverage& coverage() {
  static Coverage c;
  return c;
}

void count_paths(const std::vector<int32_t>& W, const cuda::PlanLayout& L) {
  Coverage& cov = coverage();
  for (int i = 0; i < L.n_items; ++i) {
    const int32_t flags = W[size_t(L.items + int64_t(i) * 8 + 5)];
    const int wn = cuda::item_warps_n(flags);
    if (wn == 1 || wn == 2 || wn == 4) ++cov.warps_n[wn];
    ++((flags & cuda::kItemCausal) ? cov.causal : cov.non_causal);
  }
  for (int r = 0; r < L.num_tokens; ++r)
    cov.merged_rows += W[size_t(L.row_off + r + 1)] - W[size_t(L.row_off + r)] > 1;
  for (int i = 1; i < L.n_items; ++i) {  // one tile's chunks cut into pieces: same rows, next item
    const int32_t* a = W.data() + L.items + int64_t(i - 1) * 8;
    const int32_t* b = a + 8;
    cov.split_items += a[2] == b[2] && a[3] == b[3] && a[1] == b[0];
  }
}

// head < 0: every KV head at once; else KV head `head` alone (restrict_to_head, as
// CudaBackend runs per-KV-head plans), writing only its group's heads of out / lse (which the
// run for head 0 sizes and poisons).
template <typename T, int D, typename S = AttnShape<D>>
void run_kernels(KVCache& cache, const StepPlan& plan, const CacheConfig& cfg, int sm_count, bool reference,
                 std::vector<uint16_t>& q, std::vector<uint16_t>& out, std::vector<float>& lse, int head = -1) {
  const int G = cfg.group(), H = cfg.kv_heads, Hq = cfg.q_heads, C = cfg.chunk_size;
  std::vector<int32_t> W;
  cuda::PlanLayout L;
  cuda::build_device_plan(plan, cuda::PlanBuildParams::for_cache(cfg, sm_count), W, L);
  if (!reference) count_paths(W, L);
  // The device pool [1 layer][slots][2][H][C][D], filled from the CPU cache's tiles.
  int slots = 0;
  for (int c = 0; c < L.n_chunks; ++c) slots = std::max(slots, W[size_t(L.chunk_slot + c)] + 1);
  for (int r = 0; r < L.num_tokens; ++r) slots = std::max(slots, W[size_t(L.row_slot + r)] + 1);
  const size_t tile = size_t(C) * D, slot_stride = 2 * size_t(H) * tile;
  std::vector<uint16_t> pool(size_t(slots) * slot_stride, bits_of<T>(NAN));
  const PoolView view = PoolView::chunkvale_layout(H, C, D);
  std::vector<float> t(tile);
  for (int c = 0; c < L.n_chunks; ++c) {
    const int s = W[size_t(L.chunk_slot + c)];
    for (int kv = 0; kv < 2; ++kv)
      for (int h = 0; h < H; ++h) {
        cache.read_tile(0, s, kv, h, t.data());
        const int valid = W[size_t(L.chunk_valid + c)];
        for (size_t i = 0; i < size_t(valid) * D; ++i)  // keys past `valid` stay NaN-poisoned
          pool[size_t(s) * slot_stride + (size_t(kv) * H + h) * tile + i] = bits_of<T>(t[i]);
      }
  }
  const size_t P = std::max<size_t>(1, size_t(L.p_tok) * G * H);
  std::vector<float> ml(P * 2, NAN), po(P * D, NAN);
  cuda::AttnParams ap{};
  ap.pool_layer = pool.data();
  ap.q = q.data();
  ap.items = reinterpret_cast<const cuda::DevItem*>(W.data() + L.items);
  ap.chunk_slot = W.data() + L.chunk_slot;
  ap.chunk_start = W.data() + L.chunk_start;
  ap.chunk_valid = W.data() + L.chunk_valid;
  ap.unit_rows = W.data() + L.unit_rows;
  ap.positions = W.data() + L.positions;
  ap.part_ml = ml.data();
  ap.part_o = po.data();
  ap.pool = view;
  ap.C = C;
  ap.kv_heads = H;
  ap.q_heads = Hq;
  ap.group = G;
  ap.p_tok = L.p_tok;
  ap.scale_log2 = cfg.resolved_scale() * 1.4426950408889634f;
  cuda::MergeParams mp{};
  mp.row_off = W.data() + L.row_off;
  mp.row_parts = W.data() + L.row_parts;
  mp.part_ml = ml.data();
  mp.part_o = po.data();
  if (head <= 0) {
    out.assign(size_t(L.num_tokens) * Hq * D, bits_of<T>(NAN));
    lse.assign(size_t(L.num_tokens) * Hq, NAN);
  }
  mp.out = out.data();
  mp.lse = lse.data();
  mp.num_tokens = L.num_tokens;
  mp.q_heads = Hq;
  mp.group = G;
  mp.p_tok = L.p_tok;
  mp.D = D;
  mp.out_heads = Hq;
  mp.head0 = 0;
  if (head >= 0) restrict_to_head(ap, mp, head, view.head_stride);
  if (reference)
    cuda::emu::launch(dim3(unsigned(L.n_items), unsigned(ap.kv_heads)), cuda::kThreads, 0,
                      [&] { cuda::reference_attention_kernel<T>(ap, D); });
  else
    cuda::emu::launch(dim3(unsigned(L.n_items), unsigned(ap.kv_heads)), cuda::kThreads, S::smem_bytes,
                      [&] { cuda::attention_kernel<T, D, S>(ap); });
  cuda::emu::launch(dim3(unsigned(int64_t(L.num_tokens) * mp.q_heads)), 128, 0,
                    [&] { cuda::merge_kernel<T>(mp); });
}

// append_kernel on a NaN-poisoned pool: every new row lands where the CPU backend put it.
template <typename T, int D>
void check_append(KVCache& cache, const StepPlan& plan, const CacheConfig& cfg, std::vector<uint16_t>& k,
                  std::vector<uint16_t>& v) {
  const int H = cfg.kv_heads, C = cfg.chunk_size;
  std::vector<int32_t> W;
  cuda::PlanLayout L;
  cuda::build_device_plan(plan, cuda::PlanBuildParams::for_cache(cfg, 1), W, L);
  int slots = 0;
  for (int r = 0; r < L.num_tokens; ++r) slots = std::max(slots, W[size_t(L.row_slot + r)] + 1);
  const size_t tile = size_t(C) * D, slot_stride = 2 * size_t(H) * tile;
  std::vector<uint16_t> pool(size_t(slots) * slot_stride, bits_of<T>(NAN));
  cuda::AppendParams ap{};
  ap.pool_layer = pool.data();
  ap.k = k.data();
  ap.v = v.data();
  ap.row_slot = W.data() + L.row_slot;
  ap.positions = W.data() + L.positions;
  ap.pool = PoolView::chunkvale_layout(H, C, D);
  ap.num_tokens = L.num_tokens;
  ap.kv_heads = H;
  ap.C = C;
  ap.D = D;
  cuda::emu::launch(dim3(3), 64, 0, [&] { cuda::append_kernel(ap); });  // small grid: the stride loop runs
  std::vector<float> t(tile);
  int bad = 0;
  for (int r = 0; r < L.num_tokens; ++r) {
    const int s = W[size_t(L.row_slot + r)], off = W[size_t(L.positions + r)] % C;
    for (int kv = 0; kv < 2; ++kv)
      for (int h = 0; h < H; ++h) {
        cache.read_tile(0, s, kv, h, t.data());
        for (int d = 0; d < D; ++d)
          bad += pool[size_t(s) * slot_stride + (size_t(kv) * H + h) * tile + size_t(off) * D + d] !=
                 bits_of<T>(t[size_t(off) * D + d]);
      }
  }
  EXPECT(bad == 0, "append_kernel: %d elements differ from the CPU backend's pool", bad);
}

// copy_chunk_kernel against memcpy semantics on a random pool.
void check_copy_chunk() {
  const int layers = 3, slots = 5, H = 2, C = 16, D = 64;
  const size_t tile = size_t(C) * D, slot_stride = 2 * size_t(H) * tile, layer_stride = slots * slot_stride;
  std::vector<uint16_t> pool(layers * layer_stride);
  std::mt19937 rng(7);
  for (auto& x : pool) x = uint16_t(rng());
  std::vector<uint16_t> want = pool;
  const int src = 3, dst = 1, n = 11;
  for (int l = 0; l < layers; ++l)
    for (int t = 0; t < 2 * H; ++t)
      for (size_t i = 0; i < size_t(n) * D; ++i)
        want[l * layer_stride + dst * slot_stride + t * tile + i] = pool[l * layer_stride + src * slot_stride + t * tile + i];
  cuda::CopyParams cp{};
  cp.pool = pool.data();
  cp.view = PoolView::chunkvale_layout(H, C, D);
  cp.layer_stride = int64_t(layer_stride);
  cp.src = src;
  cp.dst = dst;
  cp.n_tokens = n;
  cp.layers = layers;
  cp.kv_heads = H;
  cuda::emu::launch(dim3(2), 32, 0, [&] { cuda::copy_chunk_kernel(cp); });
  EXPECT(pool == want, "copy_chunk_kernel: pool differs from the expected copy");
}

template <typename T, int D, typename S = AttnShape<D>>
void run_case(const Case& cs, uint32_t seed, bool full) {
  CacheConfig cfg;
  cfg.layers = 1;
  cfg.q_heads = cs.q_heads;
  cfg.kv_heads = cs.kv_heads;
  cfg.head_dim = D;
  cfg.chunk_size = cs.C;
  cfg.dtype = cs.bf16 ? DType::BFloat16 : DType::Float16;
  cfg.capacity_chunks = 1024;
  cfg.threads = 2;
  cfg.share_threshold = cs.threshold;
  KVCache cache(cfg);
  std::mt19937 rng(seed);
  test::TreeScenario tree{cache, rng, {}, {}, {}};
  const double tol = cs.bf16 ? 1.5e-2 : 3e-3;

  auto step = [&](const std::vector<PlanEntry>& entries) {
    Step st = cache.plan(entries);
    const StepPlan& plan = cache.step_plan(st);
    const int T_ = plan.num_tokens, Hq = cfg.q_heads, H = cfg.kv_heads;
    std::vector<uint16_t> k(size_t(T_) * H * D), v(k.size()), q(size_t(T_) * Hq * D), out(q.size());
    std::vector<float> lse(size_t(T_) * Hq);
    for (int r = 0; r < T_; ++r) {
      const auto& tk = tree.toks[plan.seqs[size_t(plan.row_seq[size_t(r)])].seq_id];
      const size_t pos = size_t(plan.positions[size_t(r)]);
      for (int i = 0; i < H * D; ++i) {
        k[size_t(r) * H * D + i] = bits_of<T>(kv_value(tk, pos, 0, i));
        v[size_t(r) * H * D + i] = bits_of<T>(kv_value(tk, pos, 1, i));
      }
    }
    std::normal_distribution<float> nd;
    for (auto& x : q) x = bits_of<T>(nd(rng) * 1.5f);
    cache.append(0, st, view3(k, cfg.dtype, T_, H, D), view3(v, cfg.dtype, T_, H, D));
    TensorView lv;
    lv.data = lse.data();
    lv.dtype = DType::Float32;
    lv.ndim = 2;
    lv.shape[0] = T_, lv.shape[1] = Hq;
    lv.strides[0] = Hq, lv.strides[1] = 1;
    cache.attention(0, st, view3(q, cfg.dtype, T_, Hq, D), view3(out, cfg.dtype, T_, Hq, D), &lv);
    check_append<T, D>(cache, plan, cfg, k, v);

    std::vector<uint16_t> all;  // the mma run's outputs
    std::vector<float> all_l;
    for (int variant = 0; variant < 2; ++variant) {
      std::vector<uint16_t> eo;
      std::vector<float> el;
      run_kernels<T, D, S>(cache, plan, cfg, cs.sm_count, variant == 1, q, eo, el);
      if (variant == 0) all = eo, all_l = el;
      double num = 0, den = 0, lerr = 0;
      bool finite = true;
      for (size_t i = 0; i < out.size(); ++i) {
        const double a = float_of<T>(eo[i]), b = float_of<T>(out[i]);
        finite &= std::isfinite(a);
        num += (a - b) * (a - b);
        den += b * b;
      }
      for (size_t i = 0; i < lse.size(); ++i) {
        finite &= std::isfinite(el[i]);
        lerr = std::max(lerr, std::fabs(double(el[i]) - lse[i]) / std::max(1.0, std::fabs(double(lse[i]))));
      }
      const double rel = std::sqrt(num / std::max(den, 1e-30));
      EXPECT(finite && rel < tol && lerr < 1e-3,
             "%s kernel, q%d kv%d D%d C%d thr%d sm%d %s seed %u, %d rows: rel %.3g lse %.3g%s",
             variant ? "reference" : "mma", cs.q_heads, cs.kv_heads, D, cs.C, cs.threshold, cs.sm_count,
             cs.bf16 ? "bf16" : "fp16", seed, T_, rel, lerr, finite ? "" : " (non-finite)");
    }
    // Per-KV-head runs of the same plan (what per-KV-head selection launches, each head over its
    // own plan) compute exactly what one every-head run does: same items, same order per head.
    if (H > 1) {
      std::vector<uint16_t> heads;
      std::vector<float> heads_l;
      for (int h = 0; h < H; ++h) run_kernels<T, D, S>(cache, plan, cfg, cs.sm_count, false, q, heads, heads_l, h);
      const bool same = std::memcmp(all.data(), heads.data(), all.size() * 2) == 0 &&
                        std::memcmp(all_l.data(), heads_l.data(), all_l.size() * 4) == 0;
      EXPECT(same, "per-KV-head runs differ from the every-head run: q%d kv%d D%d C%d %s seed %u", cs.q_heads,
             cs.kv_heads, D, cs.C, cs.bf16 ? "bf16" : "fp16", seed);
      ++coverage().per_head_runs;
    }
  };

  tree.step = step;
  const int C = cs.C;
  if (full) {
    // Random trees: two prefixes of up to 3 chunks, five sequences on random cuts of them (each
    // prefilled in one or two steps), three decode steps of all five.
    tree.random_tree(C, 2, 5, C + 3);
  } else {
    // The smallest tree that takes every path: two sequences on one prefix of a chunk and two
    // tokens (a shared full chunk -> chunk-first, non-causal, merged with sequence-first; a
    // copied partial chunk), the first prefilled in two steps (extend); in the cheap cases
    // (C = 16, GQA group <= 4) also one of 6 private chunks, whose sequence-first decode tile
    // is split into pieces.
    const auto pre = tree.random_tokens(size_t(C + 2));
    for (int s = 0; s < 2; ++s) {
      std::vector<int32_t> tk = pre;
      const auto own = tree.random_tokens(size_t(1 + 2 * s));
      tk.insert(tk.end(), own.begin(), own.end());
      tree.prefill(tk, s == 0);
    }
    if (C == 16 && cs.q_heads / cs.kv_heads <= 4) tree.prefill(tree.random_tokens(size_t(5 * C + 3)), false);
  }
  tree.decode_all(full ? 3 : 2);
}

using Shape64x2x3 = AttnShape<64, 2, 3>;
using Shape64x1x4 = AttnShape<64, 1, 4>;
using Shape64x4x2 = AttnShape<64, 4, 2>;

bool full_sweep(int argc, char** argv) {
  for (int i = 1; i < argc; ++i)
    if (std::strcmp(argv[i], "--full") == 0) return true;
  const char* env = std::getenv("CHUNKVALE_FULL_EMULATION");
  return env != nullptr && *env != '\0' && std::strcmp(env, "0") != 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::random_device rd;
  const uint32_t base = rd();
  uint32_t n = 0;
  const bool full = full_sweep(argc, argv);
  std::printf("%s sweep (%s)\n", full ? "full" : "fast",
              full ? "CHUNKVALE_FULL_EMULATION" : "set CHUNKVALE_FULL_EMULATION=1 or --full for the full one");
  auto timed = [&](const char* name, auto run) {
    const auto t0 = std::chrono::steady_clock::now();
    const std::clock_t c0 = std::clock();
    run();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("  %-38s %7.2f s (%.2f s CPU)\n", name, s, double(std::clock() - c0) / CLOCKS_PER_SEC);
    std::fflush(stdout);
  };
  // q_heads, kv_heads, D, C, share threshold, SMs (split granularity), bf16
#define CASE(T, D, S, ...) timed(#T " D" #D " " #__VA_ARGS__, [&] { run_case<T, D, S>({__VA_ARGS__}, base + n++, full); })
  CASE(__half, 64, AttnShape<64>, 4, 4, 64, 16, 2, 2, false);
  CASE(__nv_bfloat16, 64, AttnShape<64>, 8, 2, 64, 32, 1, 3, true);
  CASE(__half, 64, AttnShape<64>, 9, 3, 64, 16, 2, 1, false);
  CASE(__nv_bfloat16, 64, AttnShape<64>, 8, 1, 64, 64, 1, 4, true);
  CASE(__half, 64, AttnShape<64>, 32, 1, 64, 16, 2, 2, false);
  CASE(__half, 80, AttnShape<80>, 4, 2, 80, 16, 1, 2, false);
  CASE(__nv_bfloat16, 128, AttnShape<128>, 16, 4, 128, 32, 2, 2, true);
  CASE(__half, 256, AttnShape<256>, 2, 1, 256, 16, 1, 1, false);
  // Other pipeline shapes (16-key blocks per stage x stages) over the same stream logic.
  CASE(__half, 64, Shape64x2x3, 8, 2, 64, 32, 1, 3, false);
  CASE(__nv_bfloat16, 64, Shape64x1x4, 4, 4, 64, 16, 2, 2, true);
  CASE(__half, 64, Shape64x4x2, 16, 4, 64, 64, 2, 2, false);
#undef CASE
  timed("copy_chunk", [] { check_copy_chunk(); });
  const Coverage& cov = coverage();
  std::printf("paths: items with 4/2/1 key-splitting warps %lld/%lld/%lld, causal %lld, non-causal %lld, "
              "split %lld; rows merged from several partials %lld; steps run per KV head %lld\n",
              (long long)cov.warps_n[4], (long long)cov.warps_n[2], (long long)cov.warps_n[1], (long long)cov.causal,
              (long long)cov.non_causal, (long long)cov.split_items, (long long)cov.merged_rows,
              (long long)cov.per_head_runs);
  // The fast sweep's trees are built to take every path; the full sweep's are random (a run
  // may miss one, which the fast sweep covers anyway).
  EXPECT(full || (cov.warps_n[4] > 0 && cov.warps_n[2] > 0 && cov.warps_n[1] > 0 && cov.causal > 0 &&
                  cov.non_causal > 0 && cov.split_items > 0 && cov.merged_rows > 0 && cov.per_head_runs > 0),
         "the fast sweep missed a kernel path (see the counts above)");
  std::printf("%s: %d failures (seed base %u)\n", failures() ? "FAIL" : "ok", failures(), base);
  return failures() ? 1 : 0;
}
