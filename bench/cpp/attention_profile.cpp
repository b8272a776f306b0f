// One layer's attention call, repeated: a target for `perf record` (symbols, no Python) and a
// quick CPU-time check of one kernel path. Not a benchmark of record (bench/ suites are).
//
//   attention_profile ISA DTYPE B NS NU QH KVH D C THREADS SECONDS
//   e.g. attention_profile avx2 float32 32 2048 128 8 8 128 64 1 5
// B sequences share NS prefix tokens, each has NU private ones, then one decode token each;
// B = 1, NS = 0 with NU = N and a prefill flag (NU negative) plans one N-token prefill.
#include <chunkvale/kv_cache.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <random>
#include <string>
#include <vector>

using namespace chunkvale;

static double cpu_now() {
  timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}

int main(int argc, char** argv) {
  if (argc != 12) {
    std::fprintf(stderr, "usage: %s ISA DTYPE B NS NU QH KVH D C THREADS SECONDS\n", argv[0]);
    return 2;
  }
  CacheConfig cfg;
  cfg.kernel_isa = std::strcmp(argv[1], "best") ? argv[1] : "";
  cfg.dtype = parse_dtype(argv[2]);
  const int B = std::atoi(argv[3]), ns = std::atoi(argv[4]);
  int nu = std::atoi(argv[5]);
  const bool prefill = nu < 0;
  if (prefill) nu = -nu;
  cfg.layers = 1;
  cfg.q_heads = std::atoi(argv[6]);
  cfg.kv_heads = std::atoi(argv[7]);
  cfg.head_dim = std::atoi(argv[8]);
  cfg.chunk_size = std::atoi(argv[9]);
  cfg.threads = std::atoi(argv[10]);
  const double seconds = std::atof(argv[11]);
  const int C = cfg.chunk_size;
  cfg.capacity_chunks = (ns + C - 1) / C + int64_t(B) * ((nu + 1 + C - 1) / C + 2) + 8;
  KVCache cache(cfg);
  const size_t elem = dtype_size(cfg.dtype);
  std::mt19937 rng(7);
  auto random_rows = [&](int64_t rows, int heads) {
    std::vector<uint8_t> buf(size_t(rows) * heads * cfg.head_dim * elem);
    std::normal_distribution<float> nd;
    for (size_t i = 0; i < buf.size() / elem; ++i) {
      float x = nd(rng);
      if (elem == 4) std::memcpy(&buf[i * 4], &x, 4);
      else {  // bf16 / fp16 bit patterns of a small value: exactness is not the point here
        uint32_t u;
        std::memcpy(&u, &x, 4);
        uint16_t h = cfg.dtype == DType::BFloat16 ? uint16_t(u >> 16) : uint16_t(0x3000 | (u >> 22 & 0x3ff));
        std::memcpy(&buf[i * 2], &h, 2);
      }
    }
    return buf;
  };
  auto view = [&](std::vector<uint8_t>& b, int64_t rows, int heads) {
    return tensor_view(b.data(), cfg.dtype, rows, heads, cfg.head_dim);
  };
  std::vector<int32_t> prefix(static_cast<size_t>(ns));
  for (int i = 0; i < ns; ++i) prefix[size_t(i)] = 1 + i;
  std::vector<PlanEntry> step_entries;
  for (int b = 0; b < B; ++b) {
    std::vector<int32_t> toks = prefix;
    for (int i = 0; i < nu; ++i) toks.push_back(100000 + b * 10000 + i);
    auto [sid, cached] = cache.add_sequence(toks);
    int64_t n = int64_t(toks.size()) - cached;
    if (prefill) {
      step_entries.push_back({sid, n, {}});
      continue;
    }
    Step st = cache.plan({{sid, n, {}}});
    auto k = random_rows(n, cfg.kv_heads);
    cache.append(0, st, view(k, n, cfg.kv_heads), view(k, n, cfg.kv_heads));
    step_entries.push_back({sid, 0, {7}});
  }
  Step st = cache.plan(step_entries);
  const int64_t rows = st.num_tokens();
  auto k = random_rows(rows, cfg.kv_heads);
  cache.append(0, st, view(k, rows, cfg.kv_heads), view(k, rows, cfg.kv_heads));
  auto q = random_rows(rows, cfg.q_heads);
  std::vector<uint8_t> out(q.size());
  cache.attention(0, st, view(q, rows, cfg.q_heads), view(out, rows, cfg.q_heads));
  int calls = 0;
  const double c0 = cpu_now();
  const auto w0 = std::chrono::steady_clock::now();
  double wall = 0;
  do {
    cache.attention(0, st, view(q, rows, cfg.q_heads), view(out, rows, cfg.q_heads));
    ++calls;
    wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - w0).count();
  } while (wall < seconds);
  std::printf("%s %s B=%d ns=%d nu=%d%s heads %d/%d d%d C%d threads %d: %.0f us wall, %.0f us cpu per call (%d calls)\n",
              argv[1], argv[2], B, ns, nu, prefill ? " prefill" : "", cfg.q_heads, cfg.kv_heads, cfg.head_dim, C,
              cfg.threads, 1e6 * wall / calls, 1e6 * (cpu_now() - c0) / calls, calls);
  return 0;
}
