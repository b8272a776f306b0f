#include "tensor_checks.h"

#include <string>

#include "chunkvale/errors.h"

namespace chunkvale {

void check_lse(const TensorView& t, TensorView::Device device, int64_t rows, int64_t q_heads) {
  if (t.device != device)
    throw TypeError(std::string("lse: expected a tensor on ") + device_name(device) + ", got one on " +
                    device_name(t.device));
  if (!t.dtype_known || t.dtype != DType::Float32)
    throw TypeError(std::string("lse: expected dtype float32, got ") + (t.dtype_known ? dtype_name(t.dtype) : t.dtype_label));
  const std::string want = "[" + std::to_string(rows) + ", " + std::to_string(q_heads) + "]";
  if (!(t.ndim == 2 && t.shape[0] == rows && t.shape[1] == q_heads)) {
    std::string have = "[";
    for (int i = 0; i < t.ndim && i < 4; ++i) have += (i ? ", " : "") + std::to_string(t.shape[i]);
    throw ValueError("lse: expected shape " + want + ", got " + have + (t.ndim > 4 ? ", ...]" : "]"));
  }
  if (rows == 0) return;  // nothing is written: numpy gives an empty array strides (0, 0)
  if (!((rows <= 1 || t.strides[0] == q_heads) && (q_heads <= 1 || t.strides[1] == 1)))
    throw ValueError("lse: expected a C-contiguous tensor of shape " + want + " (strides (" + std::to_string(q_heads) +
                     ", 1)), got strides (" + std::to_string(t.strides[0]) + ", " + std::to_string(t.strides[1]) + ")");
  if (t.data == nullptr) throw ValueError("lse: expected data, got a null pointer");
}

ByteSpan span_of(const char* name, const TensorView& t, size_t elem) {
  const uintptr_t base = reinterpret_cast<uintptr_t>(t.data);
  ByteSpan s{name, base, base};
  if (t.data == nullptr) return s;
  int64_t lo = 0, hi = 0;
  for (int i = 0; i < t.ndim && i < 4; ++i) {
    if (t.shape[i] == 0) return s;
    const int64_t reach = (t.shape[i] - 1) * t.strides[i];
    (reach < 0 ? lo : hi) += reach;
  }
  s.lo = base + uintptr_t(lo * int64_t(elem));  // lo <= 0: wraps to base - |lo| * elem
  s.hi = base + uintptr_t((hi + 1) * int64_t(elem));
  return s;
}

ByteSpan span_of(const char* name, const void* data, size_t bytes) {
  const uintptr_t base = reinterpret_cast<uintptr_t>(data);
  return ByteSpan{name, base, data ? base + bytes : base};
}

namespace {
bool overlap(const ByteSpan& a, const ByteSpan& b) { return a.lo < a.hi && b.lo < b.hi && a.lo < b.hi && b.lo < a.hi; }

[[noreturn]] void refuse(const ByteSpan& out, const ByteSpan& other, const char* rule) {
  throw ValueError(std::string(out.name) + ": expected memory apart from " + other.name + " (" + rule +
                   "), got a tensor that overlaps " + other.name + "'s memory");
}
}  // namespace

void check_apart(std::initializer_list<ByteSpan> outputs, std::initializer_list<ByteSpan> inputs) {
  for (auto o = outputs.begin(); o != outputs.end(); ++o) {
    for (const ByteSpan& in : inputs)
      if (overlap(*o, in)) refuse(*o, in, "an output never shares memory with an input");
    for (auto p = outputs.begin(); p != o; ++p)
      if (overlap(*o, *p)) refuse(*o, *p, "outputs never share memory with one another");
  }
}

}  // namespace chunkvale
