#include "chunkvale/backend.h"

#include <cstdlib>
#include <cstring>

#include "chunkvale/detail/dtype_convert.h"
#include "chunkvale/errors.h"

namespace chunkvale {

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
