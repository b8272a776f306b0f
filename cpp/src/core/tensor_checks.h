// Checks of tensor arguments that every front shares (KVCache, PagedAttention): the layout of
// an lse, and outputs that must not share memory with an input or with one another. Each
// throws TypeError / ValueError naming the argument, what was expected and what was given.
#pragma once
#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "chunkvale/tensor.h"

namespace chunkvale {

// lse: float32 [rows, q_heads] on `device`, C-contiguous (a zero-row one may have any strides).
void check_lse(const TensorView& lse, TensorView::Device device, int64_t rows, int64_t q_heads);

// The bytes [lo, hi) an argument reads or writes (empty: lo == hi).
struct ByteSpan {
  const char* name = "";
  uintptr_t lo = 0, hi = 0;
};
// A tensor of element size `elem` (any strides, negative ones too), or `bytes` from `data`.
ByteSpan span_of(const char* name, const TensorView& t, size_t elem);
ByteSpan span_of(const char* name, const void* data, size_t bytes);

// Every output apart from every input and from every other output: a call never reads what
// it writes, nor writes one result over another. Spans are compared whole, first to last
// byte (interleaved views of one buffer count as overlapping). ValueError naming the output.
void check_apart(std::initializer_list<ByteSpan> outputs, std::initializer_list<ByteSpan> inputs);

}  // namespace chunkvale
