// CpuBackend's digests: per (layer, slot, KV head) two float32 D-vectors summarising the
// chunk's keys (key_digest.h); scoring is a kernel (attention_kernels.inc), run by CpuAttention.
#include <algorithm>
#include <vector>

#include "chunkvale/errors.h"
#include "cpu_backend.h"
#include "key_digest.h"

namespace chunkvale {

float* CpuBackend::digest(int layer, int32_t slot, int head) const {
  const DigestView dv{slots_, cfg_.kv_heads, cfg_.head_dim};
  return digests_.data() + dv.layer(layer) + dv.at(slot, head);
}

void CpuBackend::update_digests(int layer, const int32_t* chunks, const int32_t* slots, size_t n,
                                const ExecContext&) {
  if (digests_.empty()) throw ValueError("eviction: digests are off for this cache");
  const int C = cfg_.chunk_size, D = cfg_.head_dim;
  std::vector<float> keys(size_t(C) * D);
  for (size_t i = 0; i < n; ++i) {
    for (int h = 0; h < cfg_.kv_heads; ++h) {
      read_tile(layer, slots[i], 0, h, keys.data());
      float* lo = digest(layer, chunks[i], h);
      key_digest(cfg_.eviction.digest, keys.data(), C, D, lo, lo + D);
    }
  }
}

void CpuBackend::top_chunks(int layer, const TensorView& q, const ScoreRequest* requests, size_t count, int k,
                            const ExecContext&) {
  if (digests_.empty()) throw ValueError("eviction: digests are off for this cache");
  ScoreArgs a;
  a.digests = digest(layer, 0, 0);
  a.digest = DigestView{slots_, cfg_.kv_heads, cfg_.head_dim};
  a.D = cfg_.head_dim;
  a.kv_heads = cfg_.kv_heads;
  a.group = cfg_.group();
  a.kind = cfg_.eviction.digest;
  a.per_kv_head = cfg_.eviction.per_kv_head();
  a.dtype = cfg_.dtype;
  attn_.top_chunks(a, static_cast<const uint8_t*>(q.data), size_t(cfg_.q_heads) * cfg_.head_dim * elem_, requests,
                   count, k);
}

void CpuBackend::read_digest(int layer, int32_t slot, int head, float* dst) const {
  if (digests_.empty()) throw ValueError("eviction: digests are off for this cache");
  const float* p = digest(layer, slot, head);
  std::copy(p, p + 2 * size_t(cfg_.head_dim), dst);
}

}  // namespace chunkvale
