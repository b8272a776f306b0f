// Small host -> device uploads on a stream (index lists for the eviction kernels): a ring
// of pinned staging + device buffers. A put's device buffer stays valid for the work queued
// on the stream after it until kDepth more puts; its pinned buffer is rewritten only after
// the copy out of it has run (one event per entry).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

namespace chunkvale {
namespace cuda {

class UploadRing {
 public:
  UploadRing() = default;
  ~UploadRing();
  UploadRing(const UploadRing&) = delete;
  UploadRing& operator=(const UploadRing&) = delete;

  // Queues a copy of `bytes` from `src` on `s`; returns the device copy. Not under capture.
  void* put(const void* src, size_t bytes, cudaStream_t s);

 private:
  static constexpr int kDepth = 4;
  struct Entry {
    void* host = nullptr;
    void* dev = nullptr;
    size_t cap = 0;
    cudaEvent_t copied = nullptr;
    bool pending = false;
  };
  void release(Entry& e);
  Entry ring_[kDepth];
  int next_ = 0;
};

}  // namespace cuda
}  // namespace chunkvale
