#include "chunkvale/backend.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "chunkvale/detail/dtype_convert.h"
#include "chunkvale/errors.h"
#include "top_k.h"

namespace chunkvale {

namespace {
[[noreturn]] void unsupported(const Backend& b, const char* what) {
  throw ValueError(std::string("eviction: ") + what + " is not implemented on the " + b.name() +
                   " backend yet; construct the cache without eviction");
}
}  // namespace

void Backend::update_digests(int, const int32_t*, const int32_t*, size_t, DigestKind) {
  unsupported(*this, "digest update");
}
void Backend::score_chunks(int, const TensorView&, const ScoreRequest*, size_t, DigestKind) {
  unsupported(*this, "chunk scoring");
}
void Backend::top_chunks(int layer, const TensorView& q, const ScoreRequest* requests, size_t count,
                         DigestKind kind, int k) {
  size_t total = 0;
  for (size_t r = 0; r < count; ++r) total += requests[r].n;
  std::vector<float> scores(total);
  std::vector<ScoreRequest> reqs(requests, requests + count);
  for (size_t r = 0, off = 0; r < count; off += reqs[r].n, ++r) reqs[r].scores = scores.data() + off;
  score_chunks(layer, q, reqs.data(), count, kind);
  std::vector<uint64_t> heap;
  for (const ScoreRequest& r : reqs) top_k(r.scores, r.n, size_t(std::max(k, 0)), r.top, heap);
}
void Backend::read_digest(int, int32_t, int, float*) const { unsupported(*this, "reading digests"); }
void Backend::open_host_tier() { unsupported(*this, "the host tier (device_chunks)"); }
uint64_t Backend::backup(int, int32_t, void*) { unsupported(*this, "backup to the host tier"); }
uint64_t Backend::backups_done() const { unsupported(*this, "backup to the host tier"); }
void Backend::wait_backup(uint64_t) { unsupported(*this, "backup to the host tier"); }
void Backend::recall(int, int32_t, const void*) { unsupported(*this, "recall from the host tier"); }
void Backend::copy_chunk_layer(int, int32_t, int32_t, int32_t) { unsupported(*this, "per-layer chunk copy"); }

HostMemory plain_host_memory() {
  return {[](size_t n) { return std::aligned_alloc(64, (n + 63) / 64 * 64); }, [](void* p) { std::free(p); }};
}

void tile_to_float(const void* src, DType dtype, size_t n, float* dst) {
  const uint8_t* p = static_cast<const uint8_t*>(src);
  if (dtype == DType::Float32) {
    std::memcpy(dst, p, n * 4);
    return;
  }
  for (size_t i = 0; i < n; ++i) {
    uint16_t b;
    std::memcpy(&b, p + 2 * i, 2);
    dst[i] = dtype == DType::Float16 ? f16_to_float(b) : bf16_to_float(b);
  }
}

}  // namespace chunkvale
