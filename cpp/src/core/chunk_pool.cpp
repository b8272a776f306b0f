#include "chunkvale/chunk_pool.h"

#include <stdexcept>
#include <string>

namespace chunkvale {

ChunkPool::ChunkPool(int64_t capacity)
    : capacity_(capacity), free_(size_t(capacity)), used_(size_t(capacity), 0) {
  // Pop order gives low slots first: a fresh cache fills memory front to back.
  for (int64_t i = 0; i < capacity; ++i) free_[size_t(i)] = int32_t(capacity - 1 - i);
}

int32_t ChunkPool::alloc() {
  if (free_.empty()) return -1;
  int32_t s = free_.back();
  free_.pop_back();
  used_[size_t(s)] = 1;
  if (++in_use_ > peak_) peak_ = in_use_;
  return s;
}

void ChunkPool::free(int32_t slot) {
  // An internal invariant: a bad free would hand one slot to two owners.
  if (slot < 0 || slot >= capacity_ || !used_[size_t(slot)])
    throw std::logic_error("chunkvale internal error: free of slot " + std::to_string(slot) +
                           " that is not in use");
  used_[size_t(slot)] = 0;
  free_.push_back(slot);
  --in_use_;
}

}  // namespace chunkvale
