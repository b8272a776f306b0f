// Host side of the device plan: re-cuts the core's work units into GPU items (row tiles x
// chunk ranges), numbers their partials and builds the per-row merge lists. Plain C++.
#include "device_plan.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace chunkvale {
namespace cuda {

bool PlanLayout::operator==(const PlanLayout& o) const {
  return items == o.items && chunk_slot == o.chunk_slot && chunk_start == o.chunk_start &&
         unit_rows == o.unit_rows && row_off == o.row_off && row_parts == o.row_parts &&
         row_slot == o.row_slot && chunk_valid == o.chunk_valid && positions == o.positions &&
         total == o.total && n_items == o.n_items && n_chunks == o.n_chunks &&
         n_unit_rows == o.n_unit_rows && n_merges == o.n_merges && num_tokens == o.num_tokens &&
         p_tok == o.p_tok;
}

PlanBuildParams PlanBuildParams::for_cache(const CacheConfig& cfg, int sm_count) {
  PlanBuildParams bp;
  bp.chunk_size = cfg.chunk_size;
  bp.group = cfg.group();
  bp.kv_heads = cfg.kv_heads;
  bp.sm_count = sm_count;
  return bp;
}

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t align4(int64_t w) { return (w + 3) & ~int64_t(3); }

// Stacked rows (token rows x group) of a unit decide the warp layout of its tiles:
// <= 16 rows: one 16-row tile, 4 warps split the keys (decode); <= 32: 2 x 2; else 4 x 1.
int warps_n_for(int64_t stacked_rows) {
  if (stacked_rows <= 16) return 4;
  if (stacked_rows <= 32) return 2;
  return 1;
}

}  // namespace

void build_device_plan(const StepPlan& P, const PlanBuildParams& bp, std::vector<int32_t>& words,
                       PlanLayout& L) {
  const int G = bp.group, C = bp.chunk_size;
  if (G > 64) throw std::invalid_argument("q_heads/kv_heads: the CUDA backend supports GQA groups up to 64");

  // Pass 1: tiles per unit and the total chunk work, to size the chunk splits so that
  // items x kv_heads fills the GPU a few times over.
  struct Tile { int32_t unit, t0, n_tok, warps_n; };
  std::vector<Tile> tiles;
  int64_t work = 0;
  for (size_t ui = 0; ui < P.units.size(); ++ui) {
    const WorkUnit& u = P.units[ui];
    const int32_t rows = u.row_end - u.row_begin;
    const int wn = warps_n_for(int64_t(rows) * G);
    const int tile_rows = 16 * (4 / wn);
    const int32_t tok_per_tile = std::max(1, tile_rows / G);
    for (int32_t t0 = 0; t0 < rows; t0 += tok_per_tile) {
      tiles.push_back({int32_t(ui), t0, std::min(tok_per_tile, rows - t0), wn});
      work += std::max(1, u.chunk_end - u.chunk_begin);
    }
  }
  const int64_t target_items =
      std::max<int64_t>(1, int64_t(std::max(1, bp.items_per_sm)) * bp.sm_count / std::max(1, bp.kv_heads));
  const int64_t piece = std::max<int64_t>(std::max(1, bp.min_piece), ceil_div(work, target_items));

  std::vector<DevItem> items;
  std::vector<std::pair<int32_t, int32_t>> merges;  // (packed row, partial token-row)
  int32_t p_tok = 0;
  for (const Tile& t : tiles) {
    const WorkUnit& u = P.units[size_t(t.unit)];
    const int32_t nch = u.chunk_end - u.chunk_begin;
    const int64_t pieces = std::max<int64_t>(1, ceil_div(nch, piece));
    for (int64_t k = 0; k < pieces; ++k) {
      DevItem it{};
      it.chunk_begin = u.chunk_begin + int32_t(nch * k / pieces);
      it.chunk_end = u.chunk_begin + int32_t(nch * (k + 1) / pieces);
      it.row_begin = u.row_begin + t.t0;
      it.n_tok = t.n_tok;
      it.pbase = p_tok;
      it.flags = (u.causal ? kItemCausal : 0) | (t.warps_n << 1);
      for (int32_t r = 0; r < t.n_tok; ++r) merges.emplace_back(P.unit_rows[size_t(it.row_begin + r)], p_tok + r);
      p_tok += t.n_tok;
      items.push_back(it);
    }
  }

  L = PlanLayout{};
  L.n_items = int32_t(items.size());
  L.n_chunks = int32_t(P.unit_chunks.size());
  L.n_unit_rows = int32_t(P.unit_rows.size());
  L.n_merges = int32_t(merges.size());
  L.num_tokens = P.num_tokens;
  L.p_tok = p_tok;
  int64_t w = 0;
  L.items = w;       w = align4(w + int64_t(items.size()) * 8);
  L.chunk_slot = w;  w = align4(w + L.n_chunks);
  L.chunk_start = w; w = align4(w + L.n_chunks);
  L.unit_rows = w;   w = align4(w + L.n_unit_rows);
  L.row_off = w;     w = align4(w + L.num_tokens + 1);
  L.row_parts = w;   w = align4(w + L.n_merges);
  // What a length-only decode step changes:
  L.row_slot = w;    w = align4(w + L.num_tokens);
  L.chunk_valid = w; w = align4(w + L.n_chunks);
  L.positions = w;   w = align4(w + L.num_tokens);
  L.total = w;

  words.assign(size_t(w), 0);
  int32_t* W = words.data();
  static_assert(sizeof(DevItem) == 8 * sizeof(int32_t), "");
  for (size_t i = 0; i < items.size(); ++i) {
    const DevItem& it = items[i];
    int32_t* d = W + L.items + int64_t(i) * 8;
    d[0] = it.chunk_begin; d[1] = it.chunk_end; d[2] = it.row_begin; d[3] = it.n_tok;
    d[4] = it.pbase; d[5] = it.flags; d[6] = 0; d[7] = 0;
  }
  for (int32_t c = 0; c < L.n_chunks; ++c) {
    const UnitChunk& ch = P.unit_chunks[size_t(c)];
    if (ch.start >= (int64_t(1) << 31) - 256)
      throw std::invalid_argument("the CUDA backend supports sequences shorter than 2^31 tokens");
    W[L.chunk_slot + c] = ch.slot;
    W[L.chunk_start + c] = int32_t(ch.start);
    W[L.chunk_valid + c] = ch.valid;
  }
  std::copy(P.unit_rows.begin(), P.unit_rows.end(), W + L.unit_rows);

  // Merge lists, CSR by packed row; counting sort keeps item order.
  int32_t* off = W + L.row_off;
  for (const auto& m : merges) ++off[m.first + 1];
  for (int32_t r = 0; r < L.num_tokens; ++r) off[r + 1] += off[r];
  std::vector<int32_t> fill(off, off + L.num_tokens);
  for (const auto& m : merges) W[L.row_parts + fill[size_t(m.first)]++] = m.second;

  for (int32_t r = 0; r < L.num_tokens; ++r) {
    const StepSeq& s = P.seqs[size_t(P.row_seq[size_t(r)])];
    const int64_t pos = P.positions[size_t(r)];
    W[L.positions + r] = int32_t(pos);
    W[L.row_slot + r] = P.seq_chunks[size_t(s.chunk_begin + pos / C)];
  }
}

void restrict_to_head(AttnParams& ap, MergeParams& mp, int head, int64_t head_stride) {
  const int64_t G = ap.group, D = mp.D;
  ap.pool_layer = static_cast<const uint16_t*>(ap.pool_layer) + head * head_stride;  // 16-bit elements
  ap.q = static_cast<const uint16_t*>(ap.q) + head * G * D;
  ap.kv_heads = 1;  // the kernels' KV head 0, one CTA row
  mp.q_heads = int32_t(G);
  mp.head0 = int32_t(head * G);
}

}  // namespace cuda
}  // namespace chunkvale
