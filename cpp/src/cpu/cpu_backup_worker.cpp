#include "cpu_backup_worker.h"

#include <chrono>
#include <cstring>

namespace chunkvale {

CpuBackupWorker::CpuBackupWorker(int delay_us) : delay_us_(delay_us), thread_([this] { run(); }) {}

CpuBackupWorker::~CpuBackupWorker() {
  {
    std::lock_guard<std::mutex> g(mu_);
    stop_ = true;
  }
  work_.notify_all();
  thread_.join();  // finishes the queue first: destinations may still be read after us
}

uint64_t CpuBackupWorker::submit(const void* src, void* dst, size_t bytes) {
  uint64_t t;
  {
    std::lock_guard<std::mutex> g(mu_);
    t = ++issued_;
    queue_.push_back({src, dst, bytes, t});
  }
  work_.notify_one();
  return t;
}

uint64_t CpuBackupWorker::done() const {
  std::lock_guard<std::mutex> g(mu_);
  return done_;
}

void CpuBackupWorker::wait(uint64_t ticket) {
  std::unique_lock<std::mutex> g(mu_);
  finished_.wait(g, [&] { return done_ >= ticket; });
}

void CpuBackupWorker::run() {
  std::unique_lock<std::mutex> g(mu_);
  for (;;) {
    work_.wait(g, [&] { return stop_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stop_ and drained
    Job j = queue_.front();
    queue_.pop_front();
    g.unlock();
    if (delay_us_ > 0) std::this_thread::sleep_for(std::chrono::microseconds(delay_us_));
    std::memcpy(j.dst, j.src, j.bytes);
    g.lock();
    done_ = j.ticket;
    finished_.notify_all();
  }
}

}  // namespace chunkvale
