#include "chunkvale/backend.h"
#include "half_type.h"

#include <cstdlib>
#include <cstring>

#include "chunkvale/errors.h"

namespace chunkvale {

HostMemory plain_host_memory() {
  return {[](size_t n) { return std::aligned_alloc(64, (n + 63) / 64 * 64); }, [](void* p) { std::free(p); }};
}

void tile_to_float(const void* src, DType dtype, size_t n, float* dst) {
  const uint8_t* p = static_cast<const uint8_t*>(src);
  for (size_t i = 0; i < n; ++i) {
    switch (dtype) {
      case DType::Float32: std::memcpy(&dst[i], p + 4 * i, 4); break;
      case DType::Float16: {
        half_t h;
        std::memcpy(&h, p + 2 * i, 2);
        dst[i] = float(h);
        break;
      }
      case DType::BFloat16: {
        uint16_t b;
        std::memcpy(&b, p + 2 * i, 2);
        uint32_t u = uint32_t(b) << 16;
        std::memcpy(&dst[i], &u, 4);
        break;
      }
    }
  }
}

}  // namespace chunkvale
