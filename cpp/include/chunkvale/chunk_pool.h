// Fixed-capacity slot allocator: O(1) alloc/free, in-use and peak counts.
// It only hands out slot numbers; the memory behind them belongs to the backend.
#pragma once
#include <cstdint>
#include <vector>

namespace chunkvale {

class ChunkPool {
 public:
  explicit ChunkPool(int64_t capacity);

  // A free slot, or -1 when none is left (the caller decides whether to reclaim).
  int32_t alloc();
  void free(int32_t slot);  // slot must be in use

  int64_t capacity() const { return capacity_; }
  int64_t in_use() const { return in_use_; }
  int64_t free_count() const { return capacity_ - in_use_; }
  int64_t peak() const { return peak_; }

 private:
  int64_t capacity_;
  int64_t in_use_ = 0;
  int64_t peak_ = 0;
  std::vector<int32_t> free_;   // stack of free slots
  std::vector<uint8_t> used_;   // catches double frees
};

}  // namespace chunkvale
