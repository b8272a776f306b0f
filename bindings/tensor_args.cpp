#include "tensor_args.h"

#include <cstdio>

namespace nb = nanobind;

namespace chunkvale::bind {

TensorView view_of(const AnyArray& a) {
  TensorView t;
  t.data = const_cast<void*>(a.data());
  const int dt = a.device_type();
  t.device = dt == nb::device::cpu::value    ? TensorView::Device::CPU
             : dt == nb::device::cuda::value ? TensorView::Device::CUDA
                                             : TensorView::Device::Other;
  t.device_id = a.device_id();
  t.ndim = int(a.ndim());
  if (t.ndim > 4) t.ndim = 4 + 1;  // reported as a shape mismatch by the core
  for (int i = 0; i < int(a.ndim()) && i < 4; ++i) {
    t.shape[i] = int64_t(a.shape(size_t(i)));
    t.strides[i] = int64_t(a.stride(size_t(i)));
  }
  nb::dlpack::dtype d = a.dtype();
  t.dtype_known = true;
  if (d.lanes == 1 && d.code == uint8_t(nb::dlpack::dtype_code::Float) && d.bits == 32) {
    t.dtype = DType::Float32;
  } else if (d.lanes == 1 && d.code == uint8_t(nb::dlpack::dtype_code::Float) && d.bits == 16) {
    t.dtype = DType::Float16;
  } else if (d.lanes == 1 && d.code == uint8_t(nb::dlpack::dtype_code::Bfloat) && d.bits == 16) {
    t.dtype = DType::BFloat16;
  } else {
    t.dtype_known = false;
    const char* kind = d.code == uint8_t(nb::dlpack::dtype_code::Int)     ? "int"
                       : d.code == uint8_t(nb::dlpack::dtype_code::UInt)  ? "uint"
                       : d.code == uint8_t(nb::dlpack::dtype_code::Float) ? "float"
                       : d.code == uint8_t(nb::dlpack::dtype_code::Bool)  ? "bool"
                                                                           : "other";
    std::snprintf(t.dtype_label, sizeof t.dtype_label, "%s%d", kind, int(d.bits));
  }
  return t;
}

}  // namespace chunkvale::bind
