// The CUDA backend's small host-side surface that is compiled into every build (with or
// without CUDA), so the bindings need no #ifdefs: the caller's stream for this thread,
// and how many GPUs the CUDA runtime can use.
//
// The Backend interface (cpp/include/chunkvale/backend.h) carries no stream handle, so
// the bindings set the caller's stream for the current thread around append/attention
// (StreamScope) and the CUDA backend reads it. 0 is CUDA's legacy default stream.
// See docs/NOTES-cuda.md.
#pragma once
#include <cstdint>

namespace chunkvale {
namespace cuda_api {

void set_thread_stream(uintptr_t stream);
uintptr_t thread_stream();

// Number of CUDA devices usable by this process; 0 when the CUDA backend was not built,
// no driver is installed or no GPU is visible. Never throws.
int device_count();
bool built();

// Sets the thread's stream for one call and restores the previous one.
class StreamScope {
 public:
  explicit StreamScope(uintptr_t stream) : prev_(thread_stream()) { set_thread_stream(stream); }
  ~StreamScope() { set_thread_stream(prev_); }
  StreamScope(const StreamScope&) = delete;
  StreamScope& operator=(const StreamScope&) = delete;

 private:
  uintptr_t prev_;
};

}  // namespace cuda_api
}  // namespace chunkvale
