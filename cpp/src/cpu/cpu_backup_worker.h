// The CPU backend's copy engine for the host tier: one thread copies queued
// (source, destination, bytes) jobs in FIFO order, so tickets complete in order.
// What a CUDA backend would do with a copy stream and one event per ticket.
#pragma once
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <thread>

namespace chunkvale {

class CpuBackupWorker {
 public:
  // delay_us: test-only slowdown of every copy (CacheConfig::test_hooks.backup_delay_us), so tests
  // can prove that nothing reuses memory a backup still reads.
  explicit CpuBackupWorker(int delay_us);
  ~CpuBackupWorker();
  CpuBackupWorker(const CpuBackupWorker&) = delete;
  CpuBackupWorker& operator=(const CpuBackupWorker&) = delete;

  uint64_t submit(const void* src, void* dst, size_t bytes);
  uint64_t done() const;  // every ticket <= done() has completed
  void wait(uint64_t ticket);

 private:
  struct Job {
    const void* src;
    void* dst;
    size_t bytes;
    uint64_t ticket;
  };
  void run();

  int delay_us_;
  mutable std::mutex mu_;
  std::condition_variable work_, finished_;
  std::deque<Job> queue_;
  uint64_t issued_ = 0, done_ = 0;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace chunkvale
