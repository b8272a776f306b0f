#include "upload_ring.h"

#include <algorithm>
#include <cstring>

#include "cuda_check.h"

namespace chunkvale {
namespace cuda {

UploadRing::~UploadRing() {
  for (Entry& e : ring_) release(e);
}

void UploadRing::release(Entry& e) {
  if (e.pending) (void)cudaEventSynchronize(e.copied);
  if (e.copied) (void)cudaEventDestroy(e.copied);
  if (e.host) (void)cudaFreeHost(e.host);
  if (e.dev) (void)cudaFree(e.dev);
  e = Entry{};
}

void* UploadRing::put(const void* src, size_t bytes, cudaStream_t s) {
  Entry& e = ring_[next_];
  next_ = (next_ + 1) % kDepth;
  if (e.pending) {
    CV_CUDA(cudaEventSynchronize(e.copied), "cudaEventSynchronize (upload ring)");
    e.pending = false;
  }
  if (bytes > e.cap) {
    // Older puts' device buffers may still be read by queued kernels: let them finish.
    CV_CUDA(cudaStreamSynchronize(s), "cudaStreamSynchronize (upload ring growth)");
    release(e);
    const size_t cap = std::max(bytes + bytes / 2, size_t(4096));
    CV_CUDA(cudaMallocHost(&e.host, cap), "cudaMallocHost (upload ring)");
    CV_CUDA(cudaMalloc(&e.dev, cap), "cudaMalloc (upload ring)");
    CV_CUDA(cudaEventCreateWithFlags(&e.copied, cudaEventDisableTiming), "cudaEventCreate (upload ring)");
    e.cap = cap;
  }
  std::memcpy(e.host, src, bytes);
  CV_CUDA(cudaMemcpyAsync(e.dev, e.host, bytes, cudaMemcpyHostToDevice, s), "cudaMemcpyAsync (upload ring)");
  CV_CUDA(cudaEventRecord(e.copied, s), "cudaEventRecord (upload ring)");
  e.pending = true;
  return e.dev;
}

}  // namespace cuda
}  // namespace chunkvale
