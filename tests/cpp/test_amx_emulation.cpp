// The matrix-engine kernels (attention_amx.inc, the source the amx_bf16 build compiles) run on
// any CPU through the tile model of amx_tiles.inc (CHUNKVALE_AMX_EMULATE) and 16-float vectors,
// on real plans: random prefix trees over a paged pool (shared blocks run chunk-first, extend
// and prefill rows causal, decode rows), GQA groups 1-8, head dims 64-256, block sizes 16-128,
// against attention computed here in double from the stored values. Outputs are poisoned
// first. bf16 caches take the tile path (counted: the test fails if it never ran, or never ran
// two row tiles at once); fp32 and fp16 caches take the 16-float lanes and dot paths of the
// same build.
//
// Tolerance per element (docs/NOTES-cpu.md): float32 arithmetic on the scores,
// 3 * 2^-23 * (1 + cond) * max|v| with cond = max_j scale * sum_d |q_d k_jd|; the rounding of
// the output to a 16-bit dtype, 2^-8 |ref| (bf16) / 2^-11 |ref| (fp16); and for the bf16 tile
// path the probabilities rounded to bf16 for P V, 2^-8 sum_j p_j |v_j| / sum_j p_j. The LSE
// keeps float32 accuracy on every path.
#define CHUNKVALE_ISA_NS amx_emulated
#define CHUNKVALE_AMX_EMULATE 1
#include "attention_kernels.inc"

#include <atomic>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "check.h"
#include "chunkvale/paged_attention.h"
#include "cpu_executor.h"

using namespace chunkvale;

namespace {

struct Case {
  int hq, hkv, D, B;
  DType dtype;
};

uint16_t store_bits(float x, DType dt) {
  return dt == DType::BFloat16 ? float_to_bf16(x) : bit_cast<uint16_t>(half_t(x));
}
double load_bits(uint16_t b, DType dt) { return dt == DType::BFloat16 ? bf16_to_float(b) : f16_to_float(b); }

// A pool of the case's dtype in vLLM's CPU layout [blocks][kv_heads][2 * B][D] (K rows, then
// V rows), filled with random values; read back as double.
struct Pool {
  DType dt;
  int blocks, hkv, B, D;
  std::vector<float> f32;
  std::vector<uint16_t> h16;
  Pool(DType dt_, int blocks_, int hkv_, int B_, int D_, std::mt19937& rng)
      : dt(dt_), blocks(blocks_), hkv(hkv_), B(B_), D(D_) {
    const size_t n = size_t(blocks) * hkv * 2 * B * D;
    std::uniform_real_distribution<float> u(-1.7f, 1.7f);
    if (dt == DType::Float32) {
      f32.resize(n);
      for (auto& x : f32) x = u(rng);
    } else {
      h16.resize(n);
      for (auto& x : h16) x = store_bits(u(rng), dt);
    }
  }
  size_t at(int blk, int h, int kv, int r, int d) const {
    return (((size_t(blk) * hkv + h) * 2 + kv) * B + r) * D + d;
  }
  double get(int blk, int h, int kv, int r, int d) const {
    const size_t i = at(blk, h, kv, r, d);
    return dt == DType::Float32 ? double(f32[i]) : load_bits(h16[i], dt);
  }
  const void* data() const { return dt == DType::Float32 ? static_cast<const void*>(f32.data()) : h16.data(); }
};

// Rows [tokens][hq][D] of the case's dtype.
struct Rows {
  DType dt;
  std::vector<float> f32;
  std::vector<uint16_t> h16;
  Rows(DType dt_, size_t n) : dt(dt_) {
    if (dt == DType::Float32)
      f32.resize(n);
    else
      h16.resize(n);
  }
  void* data() { return dt == DType::Float32 ? static_cast<void*>(f32.data()) : h16.data(); }
  void set(size_t i, float x) {
    if (dt == DType::Float32)
      f32[i] = x;
    else
      h16[i] = store_bits(x, dt);
  }
  double get(size_t i) const { return dt == DType::Float32 ? double(f32[i]) : load_bits(h16[i], dt); }
  void poison() {
    if (dt == DType::Float32)
      std::fill(f32.begin(), f32.end(), NAN);
    else
      std::fill(h16.begin(), h16.end(), uint16_t(0x7fc0));  // NaN in bf16 and fp16 alike (quiet)
  }
};

// One random batch: a few shared prefixes (whole blocks, the same block ids in every row that
// uses them, as vLLM's prefix caching gives them), each sequence a random cut of one plus
// private tokens, and its new rows (decode: 1; extend / prefill: several) at its end.
struct Batch {
  int num_seqs = 0, width = 0;
  std::vector<int32_t> table, lens, qsl;
  int blocks = 0;
};

Batch random_batch(const Case& c, std::mt19937& rng, int seqs, bool long_rows) {
  Batch b;
  b.num_seqs = seqs;
  std::vector<std::vector<int32_t>> prefixes(1 + rng() % 3);
  for (auto& p : prefixes) {
    const int n = 1 + int(rng() % 4);
    for (int i = 0; i < n; ++i) p.push_back(b.blocks++);
  }
  std::vector<std::vector<int32_t>> rows(static_cast<size_t>(seqs));
  b.qsl.push_back(0);
  for (int s = 0; s < seqs; ++s) {
    const auto& p = prefixes[rng() % prefixes.size()];
    const int shared = int(rng() % (p.size() + 1));
    rows[size_t(s)].assign(p.begin(), p.begin() + shared);
    const int own = 1 + int(rng() % (2 * c.B + 7));
    const int len = shared * c.B + own;
    for (int k = shared; k < (len + c.B - 1) / c.B; ++k) rows[size_t(s)].push_back(b.blocks++);
    const int n_new = long_rows && rng() % 2 ? 1 + int(rng() % own) : 1;
    b.lens.push_back(len);
    b.qsl.push_back(b.qsl.back() + n_new);
    b.width = std::max(b.width, int(rows[size_t(s)].size()));
  }
  b.table.assign(size_t(seqs) * b.width, 0);
  for (int s = 0; s < seqs; ++s)
    for (size_t k = 0; k < rows[size_t(s)].size(); ++k) b.table[size_t(s) * b.width + k] = rows[size_t(s)][k];
  return b;
}

std::atomic<long> g_tile_units{0};

// One batch through the emulated kernels, checked row by row against double.
void run_case(const Case& c, std::mt19937& rng, int seqs, bool long_rows, int threads) {
  const Batch b = random_batch(c, rng, seqs, long_rows);
  Pool pool(c.dtype, b.blocks, c.hkv, c.B, c.D, rng);
  const int T = b.qsl.back();
  Rows q(c.dtype, size_t(T) * c.hq * c.D), out(c.dtype, size_t(T) * c.hq * c.D);
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  for (size_t i = 0; i < size_t(T) * c.hq * c.D; ++i) q.set(i, u(rng));
  out.poison();

  PagedConfig cfg;
  cfg.q_heads = c.hq, cfg.kv_heads = c.hkv, cfg.head_dim = c.D, cfg.block_size = c.B, cfg.dtype = c.dtype;
  cfg.threads = 1;
  PagedAttention planner(cfg);
  PagedBatch pb;
  pb.num_seqs = b.num_seqs, pb.block_table = b.table.data(), pb.table_width = b.width, pb.row_stride = b.width;
  pb.seq_lens = b.lens.data(), pb.query_start_loc = b.qsl.data(), pb.num_blocks = b.blocks;
  const auto plan = planner.plan(pb);

  const KernelTable* table = amx_emulated::table(c.dtype, c.D);
  CHECK(table != nullptr);
  CpuExecutor attn(*table, threads);
  LayerArgs a;
  a.layer_base = static_cast<const uint8_t*>(pool.data());
  a.pool = PoolView::vllm_cpu_layout(c.hkv, c.B, c.D);
  a.C = c.B, a.D = c.D, a.kv_heads = c.hkv, a.group = c.hq / c.hkv, a.q_heads = c.hq;
  a.scale = 1.0f / std::sqrt(float(c.D));
  a.q = q.data(), a.out = out.data();
  a.q_row = a.out_row = int64_t(c.hq) * c.D;
  std::vector<float> lse(size_t(T) * c.hq, NAN);
  a.lse = lse.data();
  const long before = amx_emulated::tile_units().load();
  attn.run(plan->plan, a);
  g_tile_units += amx_emulated::tile_units().load() - before;

  const double scale = a.scale, u32 = std::ldexp(1.0, -23);
  const double u_out = c.dtype == DType::BFloat16 ? std::ldexp(1.0, -8) : c.dtype == DType::Float16 ? std::ldexp(1.0, -11) : 0.0;
  const double u_p = c.dtype == DType::BFloat16 ? std::ldexp(1.0, -8) : 0.0;  // P rounded to bf16 (tile path)
  int bad = 0;
  for (int s = 0; s < b.num_seqs; ++s)
    for (int t = b.qsl[size_t(s)]; t < b.qsl[size_t(s) + 1]; ++t) {
      const int p = b.lens[size_t(s)] - (b.qsl[size_t(s) + 1] - t);  // this row's position
      for (int h = 0; h < c.hq; ++h) {
        const int g = h / (c.hq / c.hkv);
        std::vector<double> w(size_t(p) + 1);
        double mx = -INFINITY, cond = 0, vmax = 0;
        for (int j = 0; j <= p; ++j) {
          const int blk = b.table[size_t(s) * b.width + j / c.B], r = j % c.B;
          double dot = 0, absdot = 0;
          for (int d = 0; d < c.D; ++d) {
            const double qd = q.get((size_t(t) * c.hq + h) * c.D + d), kd = pool.get(blk, g, 0, r, d);
            dot += qd * kd;
            absdot += std::fabs(qd * kd);
          }
          w[size_t(j)] = dot * scale;
          mx = std::max(mx, w[size_t(j)]);
          cond = std::max(cond, absdot * scale);
        }
        double sum = 0;
        for (double& x : w) sum += (x = std::exp(x - mx));
        CHECK(std::fabs(lse[size_t(t) * c.hq + h] - (mx + std::log(sum))) <= 3 * u32 * (1 + cond + std::fabs(mx + std::log(sum))) + 1e-30);
        for (int d = 0; d < c.D; ++d) {
          double ref = 0, pv = 0;
          for (int j = 0; j <= p; ++j) {
            const double v = pool.get(b.table[size_t(s) * b.width + j / c.B], g, 1, j % c.B, d);
            ref += w[size_t(j)] * v;
            pv += w[size_t(j)] * std::fabs(v);
            vmax = std::max(vmax, std::fabs(v));
          }
          ref /= sum;
          pv /= sum;
          const double got = out.get((size_t(t) * c.hq + h) * c.D + d);
          const double tol = 3 * u32 * (1 + cond) * vmax + u_out * std::fabs(ref) + u_p * pv + 1e-30;
          if (!(std::fabs(got - ref) <= tol) && bad++ < 3)
            std::fprintf(stderr, "hq%d hkv%d D%d B%d dt%d seq %d row %d head %d dim %d: got %.9g want %.9g (tol %.3g)\n",
                         c.hq, c.hkv, c.D, c.B, int(c.dtype), s, t, h, d, got, ref, tol);
        }
      }
    }
  EXPECT(bad == 0, "%d elements out of tolerance", bad);
}

}  // namespace

int main() {
  std::mt19937 rng(std::random_device{}());
  const unsigned seed = rng();
  std::printf("seed %u\n", seed);
  rng.seed(seed);
  const std::vector<std::pair<int, int>> heads = {{4, 4}, {8, 2}, {9, 3}, {32, 8}, {8, 1}};
  int cases = 0;
  // Every head dim and block size, each with two head configurations drawn from `heads`.
  for (int D : {64, 80, 96, 128, 256})
    for (int B : {16, 32, 64, 128})
      for (int draw = 0; draw < 2; ++draw) {
        auto [hq, hkv] = heads[rng() % heads.size()];
        if ((D == 256 || B == 128) && hq == 32) hq = 16;  // the slow corner: a smaller group here (and below)
        run_case({hq, hkv, D, B, DType::BFloat16}, rng, 2 + int(rng() % 12), true, 1 + int(rng() % 2));
        ++cases;
      }
  run_case({32, 8, 128, 128, DType::BFloat16}, rng, 12, true, 2);
  run_case({32, 8, 256, 64, DType::BFloat16}, rng, 6, true, 2);
  // Many sequences on one prefix: chunk-first over two and more row tiles at once.
  for (int B : {16, 64}) run_case({8, 2, 64, B, DType::BFloat16}, rng, 24, false, 2);
  // fp32 and fp16 caches: the 16-float lanes and dot paths of the same build.
  for (DType dt : {DType::Float32, DType::Float16})
    for (int D : {64, 80, 128})
      for (auto [hq, hkv] : heads) run_case({hq, hkv, D, 32, dt}, rng, 2 + int(rng() % 10), true, 2);
  std::printf("%d bf16 cases, %ld units on the tile path, %ld of them with two row tiles at once\n", cases,
              g_tile_units.load(), amx_emulated::tile_units_two_rows().load());
  CHECK(g_tile_units.load() > 0);
  CHECK(amx_emulated::tile_units_two_rows().load() > 0);
  return failures();
}
