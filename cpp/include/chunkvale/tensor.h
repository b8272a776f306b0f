// A non-owning view of a tensor crossing the API (filled from DLPack by the bindings).
#pragma once
#include <cstdint>
#include "chunkvale/config.h"

namespace chunkvale {

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::Float32;
  bool dtype_known = true;      // false: a dtype chunkvale does not store (e.g. int64)
  char dtype_label[16] = {0};   // printable dtype for error messages
  enum class Device : uint8_t { CPU, CUDA, Other } device = Device::CPU;
  int device_id = 0;
  int ndim = 0;
  int64_t shape[4] = {0, 0, 0, 0};
  int64_t strides[4] = {0, 0, 0, 0};  // in elements
};

// A C-contiguous [rows, heads, dim] view of host memory (what C++ callers pass).
inline TensorView tensor_view(void* data, DType dtype, int64_t rows, int64_t heads, int64_t dim) {
  TensorView t;
  t.data = data;
  t.dtype = dtype;
  t.ndim = 3;
  t.shape[0] = rows, t.shape[1] = heads, t.shape[2] = dim;
  t.strides[0] = heads * dim, t.strides[1] = dim, t.strides[2] = 1;
  return t;
}

// Checks a [rows, heads, dim] tensor: device, dtype, shape, C-contiguity.
// Throws TypeError / ValueError naming `arg`.
void check_tensor3(const TensorView& t, const char* arg, TensorView::Device device, DType dtype,
                   int64_t rows, int64_t heads, int64_t dim);
const char* device_name(TensorView::Device d);

}  // namespace chunkvale
