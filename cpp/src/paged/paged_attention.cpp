#include "chunkvale/paged_attention.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <tuple>
#include <vector>

#include "chunk_selection.h"
#include "chunkvale/errors.h"
#include "cpu_executor.h"
#include "plan_builder.h"
#include "tensor_checks.h"

namespace chunkvale {
namespace {

// Callers test first (`if (!ok) fail(...)`): a message is built only when a check fails, never
// per block or per layer on the hot path.
[[noreturn]] void fail(const std::string& msg) { throw ValueError(msg); }
std::string num(int64_t v) { return std::to_string(v); }

// A [rows, heads, dim] tensor whose rows may be strided (a view into a fused qkv buffer).
void check_rows(const TensorView& t, const char* arg, DType dtype, int64_t rows, int64_t heads, int64_t dim) {
  if (t.device != TensorView::Device::CPU)
    throw TypeError(std::string(arg) + ": expected a tensor on cpu, got one on " + device_name(t.device));
  if (!t.dtype_known || t.dtype != dtype)
    throw TypeError(std::string(arg) + ": expected dtype " + dtype_name(dtype) + " (the config's), got " +
                    (t.dtype_known ? dtype_name(t.dtype) : t.dtype_label));
  if (!(t.ndim == 3 && t.shape[0] == rows && t.shape[1] == heads && t.shape[2] == dim)) {
    std::string have = "[";
    for (int i = 0; i < t.ndim && i < 4; ++i) have += (i ? ", " : "") + num(t.shape[i]);
    throw ValueError(std::string(arg) + ": expected shape [" + num(rows) + ", " + num(heads) + ", " + num(dim) +
                     "], got " + have + "]");
  }
  if (rows > 0 && ((dim > 1 && t.strides[2] != 1) || (heads > 1 && t.strides[1] != dim) || (rows > 1 && t.strides[0] < heads * dim)))
    throw ValueError(std::string(arg) + ": expected contiguous heads and dims (strides (>= " + num(heads * dim) + ", " +
                     num(dim) + ", 1)), got strides (" + num(t.strides[0]) + ", " + num(t.strides[1]) + ", " +
                     num(t.strides[2]) + ")");
  if (rows > 0 && t.data == nullptr) throw ValueError(std::string(arg) + ": expected data, got a null pointer");
}

// A pool view of the config's dtype, block size, KV heads and head_dim.
void check_kv(const PagedKV& kv, const PagedConfig& c) {
  if (kv.dtype != c.dtype)
    throw TypeError(std::string("kv_cache: expected dtype ") + dtype_name(c.dtype) + " (the config's), got " +
                    dtype_name(kv.dtype));
  if (!(kv.view.C == c.block_size && kv.view.D == c.head_dim && kv.kv_heads == c.kv_heads)) fail("kv_cache: expected blocks of " + num(c.block_size) + " tokens, " + num(c.kv_heads) + " KV heads of dim " +
           num(c.head_dim) + ", got " + num(kv.view.C) + " tokens, " + num(kv.kv_heads) + " heads of dim " +
           num(kv.view.D));
}

// The bytes of the caller's pool (strides non-negative: PagedKV::vllm_cpu checked them).
ByteSpan pool_span(const PagedKV& kv, size_t elem) {
  if (kv.num_blocks == 0 || kv.kv_heads == 0) return span_of("kv_cache", kv.data, 0);
  const int64_t end = kv.view.tile(kv.num_blocks - 1, 1, kv.kv_heads - 1) + kv.view.tile_elems();
  return span_of("kv_cache", kv.data, size_t(end) * elem);
}

ByteSpan digest_span(const PagedDigests& d) {
  return span_of("digests", d.data, size_t(d.num_blocks) * size_t(d.kv_heads) * 2 * size_t(d.head_dim) * sizeof(float));
}

}  // namespace

void PagedConfig::validate() const {
  shape().validate();
  if (!(block_size >= 16 && block_size <= 512 && block_size % 16 == 0)) fail("block_size: expected a multiple of 16 in [16, 512], got " + num(block_size));
  if (!(threads >= 0 && threads <= 1024)) fail("threads: expected 0 (all cores) .. 1024, got " + num(threads));
  if (!(share_threshold >= 1)) fail("share_threshold: expected an integer >= 1, got " + num(share_threshold));
  for (int cpu : cpus)
    if (!(cpu >= 0 && cpu < 1024)) fail("cpus: expected CPU numbers in [0, 1024), got " + num(cpu));
  if (eviction.enabled) {
    eviction.validate_selection(block_size);
    const char* why = " (PagedAttention reads the caller's pool; the caller owns residency)";
    if (!(eviction.device_chunks == 0)) fail(std::string("eviction.device_chunks: expected None") + why + ", got " + num(eviction.device_chunks));
    if (!(eviction.host_bytes == 0)) fail(std::string("eviction.host_bytes: expected None") + why + ", got " + num(eviction.host_bytes));
    if (!eviction.spill_path.empty()) fail(std::string("eviction.spill_path: expected None") + why + ", got '" + eviction.spill_path + "'");
  }
}

// Budgeted runs rank a call's candidates against the caller's digest tensor, on the same
// score kernel and ranking as CpuBackend (CpuExecutor::top_chunks); made per call.
class PagedAttention::Scorer final : public ChunkScorer {
 public:
  Scorer(CpuExecutor& exec, const ScoreArgs& proto, const uint8_t* q, size_t q_row_bytes)
      : exec_(exec), proto_(proto), q_(q), q_row_bytes_(q_row_bytes) {}
  void top_chunks(const Digests::ScoreRequest* requests, size_t count, int k) override {
    exec_.top_chunks(proto_, q_, q_row_bytes_, requests, count, k);
  }

 private:
  CpuExecutor& exec_;
  const ScoreArgs& proto_;
  const uint8_t* q_;
  size_t q_row_bytes_;
};

PagedKV PagedKV::vllm_cpu(const TensorView& t, const char* arg) {
  if (t.device != TensorView::Device::CPU)
    throw TypeError(std::string(arg) + ": expected a tensor on cpu, got one on " + device_name(t.device));
  if (!t.dtype_known)
    throw TypeError(std::string(arg) + ": expected dtype float32, float16 or bfloat16, got " + t.dtype_label);
  if (t.ndim != 4 || t.shape[3] % 2 != 0)
    throw ValueError(std::string(arg) + ": expected vLLM's CPU layout [num_blocks, kv_heads, block_size, 2 * head_dim], got " +
                     num(t.ndim) + " dimensions" + (t.ndim == 4 ? " with an odd last one" : ""));
  const int64_t D = t.shape[3] / 2, B = t.shape[2];
  const bool empty = t.shape[0] == 0 || t.shape[1] == 0 || B == 0 || D == 0;
  if (!empty && (t.strides[3] != 1 || (B > 1 && t.strides[2] != 2 * D) || t.strides[1] < B * 2 * D ||
      (t.shape[0] > 1 && t.strides[0] < t.shape[1] * t.strides[1])))
    throw ValueError(std::string(arg) + ": expected each (block, head) to hold block_size contiguous rows of 2 * head_dim "
                     "elements, got strides (" + num(t.strides[0]) + ", " + num(t.strides[1]) + ", " +
                     num(t.strides[2]) + ", " + num(t.strides[3]) + ")");
  if (t.shape[0] > 0 && t.data == nullptr) throw ValueError(std::string(arg) + ": expected data, got a null pointer");
  PagedKV kv;
  kv.data = t.data;
  kv.dtype = t.dtype;
  kv.view = PoolView{t.strides[0], B * D, t.strides[1], int32_t(B), int32_t(D)};
  kv.num_blocks = t.shape[0];
  kv.kv_heads = int(t.shape[1]);
  return kv;
}

PagedAttention::PagedAttention(const PagedConfig& cfg) : cfg_(cfg) {
  cfg_.validate();
  exec_ = std::make_unique<CpuExecutor>(cfg_.dtype, cfg_.head_dim, cfg_.kernel_isa, cfg_.threads, cfg_.cpus);
  params_ = PlanParams{cfg_.block_size, cfg_.share_threshold};
  if (cfg_.eviction.enabled)
    selector_ = std::make_unique<ChunkSelector>(cfg_.eviction, cfg_.block_size, cfg_.kv_heads, params_);
}

void PagedAttention::check_digests(const PagedDigests& d, const PagedKV& kv) const {
  if (!(cfg_.eviction.enabled))
    fail("digests: expected None: this PagedAttention was made without eviction; got a digest tensor of " +
         num(d.num_blocks) + " blocks");
  if (!(d.num_blocks == kv.num_blocks && d.kv_heads == cfg_.kv_heads && d.head_dim == cfg_.head_dim))
    fail("digests: expected shape [num_blocks=" + num(kv.num_blocks) + " (kv_cache's), kv_heads=" + num(cfg_.kv_heads) +
         ", 2, head_dim=" + num(cfg_.head_dim) + "], got [" + num(d.num_blocks) + ", " + num(d.kv_heads) + ", 2, " +
         num(d.head_dim) + "]");
  if (!(d.num_blocks == 0 || d.data)) fail("digests: expected data, got a null pointer");
}

// The digests of the blocks whose last slot this write filled, from the pool.
void PagedAttention::refresh_digests(const PagedKV& kv, const PagedDigests& d, const int64_t* slot_mapping,
                                     int64_t n) {
  const int B = cfg_.block_size;
  filled_.clear();
  for (int64_t t = 0; t < n; ++t)
    if (slot_mapping[t] >= 0 && slot_mapping[t] % B == B - 1) filled_.push_back(int32_t(slot_mapping[t] / B));
  exec_->refresh_digests(layer_pool(kv), cfg_.dtype, cfg_.eviction.digest, d.data,
                         DigestView{d.num_blocks, cfg_.kv_heads, cfg_.head_dim}, filled_.data(), filled_.data(),
                         filled_.size());
}

LayerPool PagedAttention::layer_pool(const PagedKV& kv) const {
  return {static_cast<uint8_t*>(const_cast<void*>(kv.data)), kv.view, kv.kv_heads, dtype_size(cfg_.dtype)};
}

PagedSelectionCounts PagedAttention::selection_counts() const {
  std::lock_guard<std::mutex> g(run_mu_);
  PagedSelectionCounts c;
  if (selector_) {
    c.scored_blocks = selector_->counts().evict_scored_chunks;
    c.dropped_blocks = selector_->counts().evict_dropped_chunks;
  }
  return c;
}

PagedAttention::~PagedAttention() = default;

std::shared_ptr<const PagedPlan> PagedAttention::plan(const PagedBatch& b) const {
  return plan_paged(b, cfg_.block_size, cfg_.share_threshold);
}

void PagedAttention::write_kv(const PagedKV& kv, const TensorView& k, const TensorView& v,
                              const int64_t* slot_mapping, int64_t n, const PagedDigests* digests) {
  const PagedConfig& c = cfg_;
  check_kv(kv, c);
  if (digests) check_digests(*digests, kv);
  check_rows(k, "k", c.dtype, n, c.kv_heads, c.head_dim);
  check_rows(v, "v", c.dtype, n, c.kv_heads, c.head_dim);
  if (!(n == 0 || slot_mapping)) fail("slot_mapping: expected data, got a null pointer");
  const int64_t slots = kv.num_blocks * c.block_size;
  for (int64_t t = 0; t < n; ++t)
    if (!(slot_mapping[t] < slots)) fail("slot_mapping: expected slots below num_blocks * block_size = " + num(slots) +
                                      " (or negative for padding), got " + num(slot_mapping[t]) + " at row " + num(t));
  const size_t elem = dtype_size(c.dtype);
  // What this call writes (the pool, the digests) apart from what it reads: k or v viewed from
  // the pool itself, even from the very slots they are written to, is refused, not copied.
  const ByteSpan ks = span_of("k", k, elem), vs = span_of("v", v, elem),
                 ss = span_of("slot_mapping", slot_mapping, size_t(n) * sizeof(int64_t));
  if (digests)
    check_apart({pool_span(kv, elem), digest_span(*digests)}, {ks, vs, ss});
  else
    check_apart({pool_span(kv, elem)}, {ks, vs, ss});
  if (n == 0) return;
  // Rows may be strided (views into a fused qkv buffer); one row needs no stride.
  const PackedRows kr{static_cast<const uint8_t*>(k.data), n > 1 ? k.strides[0] : 0},
                   vr{static_cast<const uint8_t*>(v.data), n > 1 ? v.strides[0] : 0};
  std::lock_guard<std::mutex> g(run_mu_);
  exec_->write_rows(layer_pool(kv), kr, vr, n, [&](int64_t t) { return slot_mapping[t]; });
  if (digests) refresh_digests(kv, *digests, slot_mapping, n);
}

void PagedAttention::run(const PagedPlan& p, const PagedKV& kv, const TensorView& q, const TensorView& out,
                         const TensorView* lse, const PagedDigests* digests) {
  const PagedConfig& c = cfg_;
  if (!(p.block_size == c.block_size)) fail("plan: expected a plan for block_size " + num(c.block_size) + ", got one for " +
                                         num(p.block_size));
  check_kv(kv, c);
  if (!(kv.num_blocks >= p.num_blocks)) fail("kv_cache: expected at least the plan's num_blocks=" + num(p.num_blocks) +
                                          " blocks, got " + num(kv.num_blocks));
  const int64_t T = p.num_tokens();
  check_rows(q, "q", c.dtype, T, c.q_heads, c.head_dim);
  check_rows(out, "out", c.dtype, T, c.q_heads, c.head_dim);
  if (lse) check_lse(*lse, TensorView::Device::CPU, T, c.q_heads);
  if (digests) check_digests(*digests, kv);
  // What this call writes (out, lse) apart from what it reads (q, the pool, the digests).
  const size_t elem = dtype_size(c.dtype);
  const ByteSpan os = span_of("out", out, elem), qs = span_of("q", q, elem), ps = pool_span(kv, elem),
                 ds = digests ? digest_span(*digests) : ByteSpan{};
  if (lse)
    check_apart({os, span_of("lse", *lse, sizeof(float))}, {qs, ps, ds});
  else
    check_apart({os}, {qs, ps, ds});
  if (T == 0) return;

  const AttentionShape shape = c.shape();
  const LayerArgs a = layer_args(layer_pool(kv), shape, q.data, q.shape[0] > 1 ? q.strides[0] : shape.row_elems(),
                                 out.data, out.shape[0] > 1 ? out.strides[0] : shape.row_elems(),
                                 lse ? static_cast<float*>(lse->data) : nullptr);
  std::lock_guard<std::mutex> g(run_mu_);
  const StepPlan* plan = &p.plan;
  if (digests) {
    // Decode rows over budget select (plan() marked them); the rest attend to all.
    const ScoreArgs sa = score_args(shape, digests->data, DigestView{digests->num_blocks, c.kv_heads, c.head_dim},
                                    c.eviction);
    Scorer scorer(*exec_, sa, static_cast<const uint8_t*>(q.data), size_t(a.q_row) * elem);
    const LayerPlans kept = selector_->select(p.plan, p.decodes.data(), scorer);
    if (kept.per_head) return exec_->run_per_head(kept.plans, a, elem);
    if (kept.plans) plan = kept.plans;
  }
  exec_->run(*plan, a);
}

}  // namespace chunkvale
