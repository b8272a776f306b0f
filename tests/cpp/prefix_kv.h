// Deterministic test K/V: a function of (token prefix, salt, element), as a model's K/V is a
// function of the prefix it has seen. A reused prefix therefore has known K/V in any test.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

inline float prefix_kv_value(const std::vector<int32_t>& toks, size_t upto, uint64_t salt, int i) {
  uint64_t h = 1469598103934665603ull ^ salt;
  for (size_t k = 0; k <= upto; ++k) h = (h ^ uint32_t(toks[k])) * 1099511628211ull;
  h ^= uint64_t(i) * 0x9e3779b97f4a7c15ull;
  h ^= h >> 29;
  h *= 0xbf58476d1ce4e5b9ull;
  h ^= h >> 32;
  return float(double(h % 20001) / 10000.0 - 1.0);
}
