#include "thread_pool.h"

#include <cstring>
#include <string>

#include "chunkvale/errors.h"

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif

namespace chunkvale {

namespace {
void pin(std::thread& t, int cpu) {
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  const int err = pthread_setaffinity_np(t.native_handle(), sizeof(set), &set);
  if (err != 0)
    throw ValueError("cpus: could not pin a worker thread to CPU " + std::to_string(cpu) + " (" + std::strerror(err) +
                     ")");
#else
  (void)t;
  throw ValueError("cpus: pinning threads is supported on Linux only, got CPU " + std::to_string(cpu));
#endif
}
}  // namespace

ThreadPool::ThreadPool(int threads, const std::vector<int>& cpus) {
  if (threads <= 0) threads = int(std::thread::hardware_concurrency());
  if (threads <= 0) threads = 1;
  try {
    for (int i = 1; i < threads; ++i) {
      workers_.emplace_back([this, i] { worker(i); });
      if (!cpus.empty()) pin(workers_.back(), cpus[size_t(i) % cpus.size()]);
    }
  } catch (...) {
    {
      std::lock_guard<std::mutex> g(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
    throw;
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> g(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::drain(int index) {
  for (int64_t i; (i = next_.fetch_add(1, std::memory_order_relaxed)) < n_;) task_(ctx_, i, index);
}

void ThreadPool::worker(int index) {
  uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lk(mu_);
      wake_.wait(lk, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
    }
    drain(index);
    {
      std::lock_guard<std::mutex> g(mu_);
      if (--busy_ == 0) done_.notify_one();
    }
  }
}

void ThreadPool::run(int64_t n, Task task, void* ctx) {
  if (n <= 0) return;
  if (workers_.empty() || n == 1) {
    for (int64_t i = 0; i < n; ++i) task(ctx, i, 0);
    return;
  }
  {
    std::lock_guard<std::mutex> g(mu_);
    task_ = task;
    ctx_ = ctx;
    n_ = n;
    next_.store(0, std::memory_order_relaxed);
    busy_ = int(workers_.size());
    ++generation_;
  }
  wake_.notify_all();
  drain(0);
  std::unique_lock<std::mutex> lk(mu_);
  done_.wait(lk, [&] { return busy_ == 0; });
  task_ = nullptr;
}

}  // namespace chunkvale
