#include "top_k.h"

#include <algorithm>
#include <functional>

namespace chunkvale {

void top_k(const float* scores, size_t n, size_t k, int32_t* out, std::vector<uint64_t>& heap) {
  k = std::min(k, n);
  heap.clear();
  if (k == 0) return;
  const auto cmp = std::greater<uint64_t>();  // min-heap: front is the worst kept key
  for (size_t c = 0; c < n; ++c) {
    const uint64_t key = rank_key(scores[c], uint32_t(c));
    if (heap.size() < k) {
      heap.push_back(key);
      std::push_heap(heap.begin(), heap.end(), cmp);
    } else if (key > heap.front()) {
      std::pop_heap(heap.begin(), heap.end(), cmp);
      heap.back() = key;
      std::push_heap(heap.begin(), heap.end(), cmp);
    }
  }
  std::sort(heap.begin(), heap.end(), cmp);  // best first
  for (size_t j = 0; j < k; ++j) out[j] = int32_t(uint32_t(heap[j]));
}

}  // namespace chunkvale
