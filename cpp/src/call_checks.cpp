#include "call_checks.h"

#include <string>

#include "chunkvale/errors.h"

namespace chunkvale {

void check_index(const char* arg, int64_t v, int64_t n, const char* what) {
  if (v < 0 || v >= n)
    throw ValueError(std::string(arg) + ": expected " + what + " in 0.." + std::to_string(n - 1) + ", got " +
                     std::to_string(v));
}

void check_attention_args(const CacheConfig& cfg, TensorView::Device device, int64_t rows, const TensorView& q,
                          const TensorView& out, const TensorView* lse) {
  check_tensor3(q, "q", device, cfg.dtype, rows, cfg.q_heads, cfg.head_dim);
  check_tensor3(out, "out", device, cfg.dtype, rows, cfg.q_heads, cfg.head_dim);
  if (out.data == q.data && rows > 0) throw ValueError("out: expected a buffer distinct from q, got the same memory");
  if (!lse) return;
  TensorView l3 = *lse;  // check as [rows, q_heads, 1]
  if (l3.ndim == 2) {
    l3.ndim = 3;
    l3.shape[2] = 1;
    l3.strides[2] = 1;
  } else {
    l3.ndim = -1;
  }
  try {
    check_tensor3(l3, "lse", device, DType::Float32, rows, cfg.q_heads, 1);
  } catch (const ValueError&) {
    throw ValueError("lse: expected a C-contiguous float32 tensor of shape [" + std::to_string(rows) + ", " +
                     std::to_string(cfg.q_heads) + "]");
  }
}

}  // namespace chunkvale
