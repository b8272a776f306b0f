// A small persistent thread pool: parallel_for over item indices with dynamic
// scheduling; the calling thread works too. No allocation per call.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <type_traits>
#include <mutex>
#include <thread>
#include <vector>

namespace chunkvale {

class ThreadPool {
 public:
  // `threads`: total including the caller; 0 = all cores. `cpus`: where the workers run,
  // worker i (1 .. threads - 1) pinned to cpus[i % cpus.size()] (Linux; a caller that pinned
  // its own thread, as vLLM's CPU worker does, would otherwise hand its one CPU to every
  // worker it starts); empty = inherit the caller's affinity. ValueError naming `cpus` when
  // a pin fails.
  explicit ThreadPool(int threads, const std::vector<int>& cpus = {});
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return int(workers_.size()) + 1; }
  // Calls fn(item, thread_index) for every item in [0, n). Not reentrant.
  // Takes the callable by reference through a plain function pointer: no allocation.
  template <class F>
  void parallel_for(int64_t n, F&& fn) {
    run(n, [](void* ctx, int64_t i, int t) { (*static_cast<std::remove_reference_t<F>*>(ctx))(i, t); },
        const_cast<void*>(static_cast<const void*>(&fn)));
  }

 private:
  using Task = void (*)(void*, int64_t, int);
  void run(int64_t n, Task task, void* ctx);
  void worker(int index);
  void drain(int index);

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  Task task_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};
  int busy_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

}  // namespace chunkvale
