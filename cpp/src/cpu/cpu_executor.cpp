#include "cpu_executor.h"

#include <algorithm>

#include "chunkvale/errors.h"
#include "head_scores.h"
#include "key_digest.h"
#include "top_k.h"

namespace chunkvale {

CpuExecutor::CpuExecutor(DType dtype, int head_dim, const std::string& kernel_isa, int threads,
                         const std::vector<int>& cpus)
    : kernels_(kernels_for(dtype, head_dim, kernel_isa)), threads_(threads, cpus) {
  if (!kernels_)
    throw ValueError("head_dim: expected 64, 80, 96, 128 or 256, got " + std::to_string(head_dim));
  scratch_.resize(size_t(threads_.size()));
}

CpuExecutor::CpuExecutor(const KernelTable& kernels, int threads) : kernels_(&kernels), threads_(threads, {}) {
  scratch_.resize(size_t(threads_.size()));
}

LayerArgs layer_args(const LayerPool& pool, const AttentionShape& shape, const void* q, int64_t q_row, void* out,
                     int64_t out_row, float* lse) {
  LayerArgs a;
  a.layer_base = pool.base;
  a.pool = pool.view;
  a.C = pool.view.C;
  a.D = shape.head_dim;
  a.kv_heads = shape.kv_heads;
  a.group = shape.group();
  a.q_heads = shape.q_heads;
  a.scale = shape.scale();
  a.q = q;
  a.out = out;
  a.q_row = q_row;
  a.out_row = out_row;
  a.lse = lse;
  return a;
}

ScoreArgs score_args(const AttentionShape& shape, const float* layer_digests, const DigestView& view,
                     const EvictionConfig& eviction) {
  ScoreArgs a;
  a.digests = layer_digests;
  a.digest = view;
  a.D = shape.head_dim;
  a.kv_heads = shape.kv_heads;
  a.group = shape.group();
  a.kind = eviction.digest;
  a.per_kv_head = eviction.per_kv_head();
  a.dtype = shape.dtype;
  return a;
}

void CpuExecutor::refresh_digests(const LayerPool& pool, DType dtype, DigestKind kind, float* digests,
                                  const DigestView& view, const int32_t* ids, const int32_t* slots, size_t n) {
  const int H = pool.kv_heads, C = pool.view.C, D = pool.view.D;
  keys_.resize(size_t(threads_.size()));
  for (auto& k : keys_)
    if (k.size() < size_t(C) * D) k.resize(size_t(C) * D);
  auto one = [&](int64_t i, int t) {
    const size_t b = size_t(i / H);
    const int h = int(i % H);
    float* keys = keys_[size_t(t)].data();
    tile_to_float(pool.tile(slots[b], 0, h), dtype, size_t(C) * D, keys);  // a tile's rows are contiguous
    float* lo = digests + view.at(ids[b], h);
    key_digest(kind, keys, C, D, lo, lo + D);
  };
  // A digest costs about one pass over a tile: a few blocks are not worth waking the threads.
  const int64_t items = int64_t(n) * H;
  if (items >= 8)
    threads_.parallel_for(items, one);
  else
    for (int64_t i = 0; i < items; ++i) one(i, 0);
}

void CpuExecutor::run(const StepPlan& plan, LayerArgs a) {
  // Every layer of a step shares one cut, and decode steps that only bump the plan keep it.
  if (cuts_.plan_layout != plan.layout || plan.layout == 0)
    cut_for_threads(plan, threads_.size(), a.kv_heads, cuts_);
  const size_t prow = size_t(a.kv_heads) * size_t(cuts_.partial_rows) * size_t(a.group);
  if (part_ml_.size() < prow * 2) part_ml_.resize(prow * 2);
  if (part_o_.size() < prow * size_t(a.D)) part_o_.resize(prow * size_t(a.D));
  a.plan = &plan;
  a.cuts = &cuts_;
  a.part_ml = part_ml_.data();
  a.part_o = part_o_.data();

  // Phase 1: every (piece, KV head); chunk-first pieces come first, so the biggest items
  // start early and the dynamic schedule balances the tail.
  const int H = a.kv_heads;
  const int64_t items = int64_t(cuts_.pieces.size()) * H;
  threads_.parallel_for(items, [&](int64_t i, int t) {
    kernels_->run_piece(a, int32_t(i / H), int(i % H), scratch_[size_t(t)]);
  });
  // Phase 2: merge each row's partials (exact log-sum-exp combination).
  threads_.parallel_for(plan.num_tokens, [&](int64_t r, int) { kernels_->merge_row(a, int32_t(r)); });
}

void CpuExecutor::run_per_head(const StepPlan* plans, const LayerArgs& a, size_t elem_bytes) {
  // KV head h as a cache of one KV head: its query and output heads and its pool tiles are
  // views at head h's offsets (rows keep their strides); lse comes back per group, in rows of
  // group entries, and is laid into the caller's rows.
  const int G = a.group;
  const int32_t rows = plans[0].num_tokens;  // every head's plan has the step's rows
  if (a.lse) head_lse_.resize(size_t(rows) * size_t(G));
  for (int h = 0; h < a.kv_heads; ++h) {
    LayerArgs ah = a;
    ah.kv_heads = 1;
    ah.q_heads = G;
    ah.q = static_cast<const uint8_t*>(a.q) + size_t(h) * G * a.D * elem_bytes;
    ah.out = static_cast<uint8_t*>(a.out) + size_t(h) * G * a.D * elem_bytes;
    ah.layer_base = a.layer_base + size_t(a.pool.head_stride) * size_t(h) * elem_bytes;
    ah.lse = a.lse ? head_lse_.data() : nullptr;
    run(plans[h], ah);
    if (a.lse)
      for (int32_t r = 0; r < rows; ++r)
        for (int g = 0; g < G; ++g) a.lse[size_t(r) * a.q_heads + size_t(h) * G + g] = head_lse_[size_t(r) * G + g];
  }
}

void CpuExecutor::top_chunks(const ScoreArgs& proto, const uint8_t* q, size_t q_row_bytes,
                              const Digests::ScoreRequest* requests, size_t count, int k) {
  // Shared: one score per candidate; per KV head: kv_heads of them, [request][head][candidate].
  const size_t units = proto.per_kv_head ? size_t(proto.kv_heads) : 1;
  std::vector<size_t>& first = score_first_;  // each request's first candidate
  first.assign(count + 1, 0);
  for (size_t r = 0; r < count; ++r) first[r + 1] = first[r] + requests[r].n;
  scores_.resize(first[count] * units);
  const size_t qf = proto.per_kv_head ? size_t(proto.kv_heads) * proto.group * proto.D
                                      : size_t(proto.kv_heads) * (2 * size_t(proto.D) + 1);
  score_q_.resize(size_t(threads_.size()));
  for (auto& s : score_q_)
    if (s.size() < qf) s.resize(qf);
  // Pieces of at most kPiece candidates, so one long sequence still spreads over the
  // threads; reading digests is memory-bound.
  constexpr size_t kPiece = 128;
  score_items_.clear();
  for (size_t r = 0; r < count; ++r)
    for (size_t c = 0; c < requests[r].n; c += kPiece) score_items_.emplace_back(r, c);
  threads_.parallel_for(int64_t(score_items_.size()), [&](int64_t i, int t) {
    const auto [r, c0] = score_items_[size_t(i)];
    const Digests::ScoreRequest& req = requests[r];
    ScoreArgs a = proto;
    a.q = q + size_t(req.row) * q_row_bytes;
    a.slots = req.slots + c0;
    a.n = std::min(kPiece, req.n - c0);
    a.qf = score_q_[size_t(t)].data();
    if (!proto.per_kv_head) {
      a.scores = scores_.data() + first[r] + c0;
      kernels_->score_chunks(a);
      return;
    }
    tile_to_float(a.q, a.dtype, size_t(a.kv_heads) * a.group * a.D, a.qf);
    score_chunks_per_head(a, a.qf, scores_.data() + first[r] * units + c0, req.n);
  });
  const size_t kk = size_t(std::max(k, 0));
  for (size_t r = 0; r < count; ++r)
    for (size_t u = 0; u < units; ++u)
      top_k(scores_.data() + first[r] * units + u * requests[r].n, requests[r].n, kk, requests[r].top + u * kk, heap_);
}

}  // namespace chunkvale
