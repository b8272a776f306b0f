#include "call_checks.h"

#include <string>

#include "chunkvale/errors.h"
#include "tensor_checks.h"

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
  if (lse) check_lse(*lse, device, rows, cfg.q_heads);
  const size_t elem = dtype_size(cfg.dtype);
  if (lse)
    check_apart({span_of("out", out, elem), span_of("lse", *lse, 4)}, {span_of("q", q, elem)});
  else
    check_apart({span_of("out", out, elem)}, {span_of("q", q, elem)});
}

}  // namespace chunkvale
