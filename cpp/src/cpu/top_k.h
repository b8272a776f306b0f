// The k best candidates by score, ties to the later candidate (recency, deterministically):
// the ranking rule of budgeted attention, shared by the host path and the tests of the
// device path. Scores become 64-bit keys, the float's bits made order-preserving above
// the index, so ranking compares integers and a min-heap of the best k rejects most
// candidates with one compare (k is small next to the candidates).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace chunkvale {

// A score and its candidate index as one key; larger key = ranked first.
inline uint64_t rank_key(float score, uint32_t index) {
  uint32_t u;
  __builtin_memcpy(&u, &score, 4);
  if (u == 0x80000000u) u = 0;                       // -0 ties with +0, as floats compare
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);    // float order as unsigned order
  return (uint64_t(u) << 32) | uint64_t(index);
}

// Writes the indices of the min(k, n) best of scores[0, n) to out, best first.
void top_k(const float* scores, size_t n, size_t k, int32_t* out, std::vector<uint64_t>& scratch);

}  // namespace chunkvale
