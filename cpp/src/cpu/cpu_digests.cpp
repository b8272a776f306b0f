// CpuBackend's digests: per (layer, slot, KV head) two float32 D-vectors summarising the
// chunk's keys (key_digest.h); scoring is a kernel (attention_kernels.inc), run by CpuExecutor.
#include <algorithm>

#include "chunkvale/errors.h"
#include "cpu_backend.h"

namespace chunkvale {

float* CpuBackend::digest(int layer, int32_t slot, int head) const {
  const DigestView dv{slots_, cfg_.kv_heads, cfg_.head_dim};
  return digests_.data() + dv.layer(layer) + dv.at(slot, head);
}

void CpuBackend::update_digests(int layer, const int32_t* chunks, const int32_t* slots, size_t n,
                                const ExecContext&) {
  if (digests_.empty()) throw ValueError("eviction: digests are off for this cache");
  exec_.refresh_digests(layer_pool(layer), cfg_.dtype, cfg_.eviction.digest, digest(layer, 0, 0),
                        DigestView{slots_, cfg_.kv_heads, cfg_.head_dim}, chunks, slots, n);
}

void CpuBackend::top_chunks(int layer, const TensorView& q, const ScoreRequest* requests, size_t count, int k,
                            const ExecContext&) {
  if (digests_.empty()) throw ValueError("eviction: digests are off for this cache");
  const AttentionShape shape = cfg_.shape();
  const ScoreArgs a = score_args(shape, digest(layer, 0, 0), DigestView{slots_, cfg_.kv_heads, cfg_.head_dim}, cfg_.eviction);
  exec_.top_chunks(a, static_cast<const uint8_t*>(q.data), size_t(shape.row_elems()) * elem_, requests, count, k);
}

void CpuBackend::read_digest(int layer, int32_t slot, int head, float* dst) const {
  if (digests_.empty()) throw ValueError("eviction: digests are off for this cache");
  const float* p = digest(layer, slot, head);
  std::copy(p, p + 2 * size_t(cfg_.head_dim), dst);
}

}  // namespace chunkvale
