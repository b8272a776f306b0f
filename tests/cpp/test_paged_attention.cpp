// PagedAttention from C++, as a serving stack embeds it: its own pool in vLLM's CPU layout, page
// tables per step, write_kv then plan/run; dense and budgeted rows against attention computed
// here in double; bad input (outputs over inputs or the pool too) named with nothing written.
#include "chunkvale/paged_attention.h"

#include <cmath>
#include <random>
#include <vector>

#include "check.h"
#include "chunkvale/errors.h"

using namespace chunkvale;

namespace {
constexpr int HQ = 4, HKV = 2, D = 64, B = 16, N = 12;

struct Pool {
  std::vector<float> data = std::vector<float>(size_t(N) * HKV * B * 2 * D, 0.0f);
  TensorView view() {
    TensorView t;
    t.data = data.data();
    t.ndim = 4;
    t.shape[0] = N, t.shape[1] = HKV, t.shape[2] = B, t.shape[3] = 2 * D;
    t.strides[3] = 1, t.strides[2] = 2 * D, t.strides[1] = int64_t(B) * 2 * D, t.strides[0] = int64_t(HKV) * B * 2 * D;
    return t;
  }
};

// Per sequence: its block ids and its K/V history [pos][head][D], written through write_kv.
struct Seq {
  std::vector<int32_t> blocks;
  std::vector<float> k, v;
  int len() const { return int(k.size() / (HKV * D)); }
};

void write(PagedAttention& pa, Pool& pool, Seq& s, int from, int to, const PagedDigests* dg) {
  std::vector<int64_t> slots;
  for (int p = from; p < to; ++p) slots.push_back(int64_t(s.blocks[size_t(p / B)]) * B + p % B);
  const int n = to - from;
  TensorView k = tensor_view(s.k.data() + size_t(from) * HKV * D, DType::Float32, n, HKV, D);
  TensorView v = tensor_view(s.v.data() + size_t(from) * HKV * D, DType::Float32, n, HKV, D);
  pa.write_kv(PagedKV::vllm_cpu(pool.view()), k, v, slots.data(), n, dg);
}

// The last row's attention over the positions `keep` of a sequence, in double.
std::vector<double> attend(const Seq& s, const std::vector<int>& keep, const float* q) {
  std::vector<double> out(size_t(HQ) * D, 0.0);
  for (int h = 0; h < HQ; ++h) {
    const int g = h / (HQ / HKV);
    std::vector<double> w;
    double mx = -1e300;
    for (int p : keep) {
      double dot = 0;
      for (int d = 0; d < D; ++d) dot += double(q[h * D + d]) * s.k[(size_t(p) * HKV + g) * D + d];
      w.push_back(dot / std::sqrt(double(D)));
      mx = std::max(mx, w.back());
    }
    double sum = 0;
    for (double& x : w) sum += (x = std::exp(x - mx));
    for (size_t i = 0; i < keep.size(); ++i)
      for (int d = 0; d < D; ++d) out[size_t(h) * D + d] += w[i] / sum * s.v[(size_t(keep[i]) * HKV + g) * D + d];
  }
  return out;
}

double max_diff(const std::vector<double>& want, const float* got) {
  double m = 0;
  for (size_t i = 0; i < want.size(); ++i) m = std::max(m, std::fabs(want[i] - got[i]));
  return m;
}

PagedBatch batch_of(const std::vector<Seq*>& seqs, std::vector<int32_t>& table, std::vector<int32_t>& lens,
                    std::vector<int32_t>& qsl, int width) {
  table.assign(seqs.size() * size_t(width), 0);
  lens.clear();
  qsl.assign(1, 0);
  for (size_t i = 0; i < seqs.size(); ++i) {
    std::copy(seqs[i]->blocks.begin(), seqs[i]->blocks.end(), table.begin() + long(i) * width);
    lens.push_back(seqs[i]->len());
    qsl.push_back(qsl.back() + 1);  // one decode row each
  }
  PagedBatch b;
  b.num_seqs = int32_t(seqs.size());
  b.block_table = table.data();
  b.table_width = width;
  b.row_stride = width;
  b.seq_lens = lens.data();
  b.query_start_loc = qsl.data();
  b.num_blocks = N;
  return b;
}

void fill(std::mt19937& rng, std::vector<float>& x, size_t n) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (size_t i = 0; i < n; ++i) x.push_back(u(rng));
}

std::vector<int> range(int a, int b) {
  std::vector<int> r;
  for (int i = a; i < b; ++i) r.push_back(i);
  return r;
}

// Two sequences share their first two blocks; one decode row each; the shared blocks run
// chunk-first and both rows match attention over their whole history.
void dense_shared_prefix() {
  std::mt19937 rng(7);
  PagedConfig c;
  c.q_heads = HQ, c.kv_heads = HKV, c.head_dim = D, c.block_size = B, c.threads = 2;
  PagedAttention pa(c);
  Pool pool;
  Seq a{{5, 2, 9}}, b{{5, 2, 0, 7}};
  fill(rng, a.k, size_t(40) * HKV * D), fill(rng, a.v, size_t(40) * HKV * D);
  b.k.assign(a.k.begin(), a.k.begin() + 32 * HKV * D), b.v.assign(a.v.begin(), a.v.begin() + 32 * HKV * D);
  fill(rng, b.k, size_t(18) * HKV * D), fill(rng, b.v, size_t(18) * HKV * D);
  write(pa, pool, a, 0, 40, nullptr);
  write(pa, pool, b, 32, 50, nullptr);
  std::vector<int32_t> table, lens, qsl;
  auto plan = pa.plan(batch_of({&a, &b}, table, lens, qsl, 4));
  CHECK(plan->chunk_first_units() >= 1 && plan->chunk_first_blocks() >= 2);
  std::vector<float> q, out(size_t(2) * HQ * D, NAN);
  fill(rng, q, size_t(2) * HQ * D);
  pa.run(*plan, PagedKV::vllm_cpu(pool.view()), tensor_view(q.data(), DType::Float32, 2, HQ, D),
         tensor_view(out.data(), DType::Float32, 2, HQ, D));
  EXPECT(max_diff(attend(a, range(0, 40), q.data()), out.data()) < 1e-5, "seq a");
  EXPECT(max_diff(attend(b, range(0, 50), q.data() + HQ * D), out.data() + HQ * D) < 1e-5, "seq b");
}

// A decode row over budget attends to its sink, its window and the one block whose keys line
// up with its query (planted), nothing else; written in two calls, digests follow.
void budgeted_selection() {
  std::mt19937 rng(11);
  PagedConfig c;
  c.q_heads = HQ, c.kv_heads = HKV, c.head_dim = D, c.block_size = B, c.threads = 2;
  c.eviction.enabled = true;
  c.eviction.budget_tokens = 4 * B, c.eviction.sink_chunks = 1, c.eviction.window_chunks = 2, c.eviction.topk_chunks = 1;
  PagedAttention pa(c);
  Pool pool;
  std::vector<float> digests(size_t(N) * HKV * 2 * D, NAN);
  const PagedDigests dg{digests.data(), N, HKV, D};
  Seq s{{3, 8, 1, 10, 4, 6, 11}};  // 7 blocks, the last partial
  const int len = 6 * B + 5;
  fill(rng, s.k, size_t(len) * HKV * D), fill(rng, s.v, size_t(len) * HKV * D);
  std::vector<float> q;
  fill(rng, q, size_t(HQ) * D);
  for (int p = 3 * B; p < 4 * B; ++p)  // block 3 (id 10): keys along the query
    for (int h = 0; h < HKV; ++h)
      for (int d = 0; d < D; ++d) s.k[(size_t(p) * HKV + h) * D + d] = 8.0f * q[size_t(h * (HQ / HKV)) * D + d];
  write(pa, pool, s, 0, 50, &dg);
  write(pa, pool, s, 50, len, &dg);
  for (int d = 0; d < D; ++d) {  // block id 10, head 0: min and max over its keys
    float mn = 1e30f, mx = -1e30f;
    for (int p = 3 * B; p < 4 * B; ++p) mn = std::min(mn, s.k[size_t(p) * HKV * D + d]), mx = std::max(mx, s.k[size_t(p) * HKV * D + d]);
    EXPECT(digests[size_t(10) * HKV * 2 * D + d] == mn && digests[size_t(10) * HKV * 2 * D + D + d] == mx, "digest d=%d", d);
  }
  CHECK(std::isnan(digests[size_t(11) * HKV * 2 * D]));  // the partial last block has none
  std::vector<int32_t> table, lens, qsl;
  auto plan = pa.plan(batch_of({&s}, table, lens, qsl, 7));
  std::vector<float> out(size_t(HQ) * D, NAN);
  const PagedKV kv = PagedKV::vllm_cpu(pool.view());
  pa.run(*plan, kv, tensor_view(q.data(), DType::Float32, 1, HQ, D), tensor_view(out.data(), DType::Float32, 1, HQ, D),
         nullptr, &dg);
  std::vector<int> keep = range(0, B);
  for (int p : range(3 * B, 4 * B)) keep.push_back(p);
  for (int p : range(5 * B, len)) keep.push_back(p);
  EXPECT(max_diff(attend(s, keep, q.data()), out.data()) < 1e-5, "budgeted row: %g", max_diff(attend(s, keep, q.data()), out.data()));
  const PagedSelectionCounts counts = pa.selection_counts();
  EXPECT(counts.scored_blocks == 4 && counts.dropped_blocks == 3, "scored %lld dropped %lld",
         (long long)counts.scored_blocks, (long long)counts.dropped_blocks);
  // Without digests the same object attends densely.
  pa.run(*plan, kv, tensor_view(q.data(), DType::Float32, 1, HQ, D), tensor_view(out.data(), DType::Float32, 1, HQ, D));
  EXPECT(max_diff(attend(s, range(0, len), q.data()), out.data()) < 1e-5, "dense row");
}

void bad_input_is_named_and_nothing_is_written() {
  PagedConfig c;
  c.q_heads = HQ, c.kv_heads = HKV, c.head_dim = D, c.block_size = B;
  PagedAttention pa(c);
  Pool pool;
  std::vector<float> k(size_t(2) * HKV * D, 1.0f);
  const int64_t slots[2] = {3, int64_t(N) * B};
  CHECK_THROWS(pa.write_kv(PagedKV::vllm_cpu(pool.view()), tensor_view(k.data(), DType::Float32, 2, HKV, D),
                           tensor_view(k.data(), DType::Float32, 2, HKV, D), slots, 2),
               ValueError, "slot_mapping: expected slots below");
  bool untouched = true;
  for (float x : pool.data) untouched = untouched && x == 0.0f;
  CHECK(untouched);
  std::vector<float> digests(size_t(N) * HKV * 2 * D);
  const PagedDigests dg{digests.data(), N, HKV, D};
  const int64_t ok_slots[2] = {3, 4};
  CHECK_THROWS(pa.write_kv(PagedKV::vllm_cpu(pool.view()), tensor_view(k.data(), DType::Float32, 2, HKV, D),
                           tensor_view(k.data(), DType::Float32, 2, HKV, D), ok_slots, 2, &dg),
               ValueError, "digests: expected None");
  const int32_t table[2] = {0, int32_t(N)}, lens[1] = {20}, qsl[2] = {0, 1};
  PagedBatch b;
  b.num_seqs = 1, b.block_table = table, b.table_width = 2, b.row_stride = 2, b.seq_lens = lens;
  b.query_start_loc = qsl, b.num_blocks = N;
  CHECK_THROWS(pa.plan(b), ValueError, "block_table: expected block ids in [0, num_blocks=12)");
  PagedConfig e = c;
  e.eviction.enabled = true, e.eviction.budget_tokens = 8 * B, e.eviction.device_chunks = 16;
  CHECK_THROWS(PagedAttention{e}, ValueError, "eviction.device_chunks: expected None");

  // Outputs apart from inputs and the pool (the check KVCache::attention runs too).
  const int32_t one_table[2] = {0, 1};
  b.block_table = one_table;
  const auto plan = pa.plan(b);
  std::vector<float> q(size_t(HQ) * D, 0.5f), lse(HQ, 7.0f);
  const PagedKV kv = PagedKV::vllm_cpu(pool.view());
  const TensorView qv = tensor_view(q.data(), DType::Float32, 1, HQ, D);
  const TensorView in_pool = tensor_view(pool.data.data(), DType::Float32, 1, HQ, D);  // out over the pool
  TensorView lv = tensor_view(q.data(), DType::Float32, 1, HQ, 1);  // lse over q's first floats
  lv.ndim = 2;
  CHECK_THROWS(pa.run(*plan, kv, qv, in_pool, nullptr), ValueError, "out: expected memory apart from kv_cache");
  std::vector<float> out(q.size(), 7.0f);
  CHECK_THROWS(pa.run(*plan, kv, qv, tensor_view(out.data(), DType::Float32, 1, HQ, D), &lv), ValueError,
               "lse: expected memory apart from q");
  const int64_t row3[1] = {3};
  CHECK_THROWS(pa.write_kv(kv, tensor_view(pool.data.data() + 3 * 2 * D, DType::Float32, 1, HKV, D),  // k from slot 3
                           tensor_view(k.data(), DType::Float32, 1, HKV, D), row3, 1),
               ValueError, "kv_cache: expected memory apart from k");
  bool unchanged = q == std::vector<float>(q.size(), 0.5f) && out == std::vector<float>(out.size(), 7.0f);
  for (float x : pool.data) unchanged = unchanged && x == 0.0f;
  CHECK(unchanged);
}
}  // namespace

int main() {
  dense_shared_prefix();
  budgeted_selection();
  bad_input_is_named_and_nothing_is_written();
  return failures();
}
