// The CPU backend: owns the pool memory and runs the kernels on a thread pool.
#pragma once
#include <memory>
#include <vector>

#include "chunkvale/backend.h"
#include "cpu_backup_worker.h"
#include "kernels.h"
#include "thread_pool.h"

namespace chunkvale {

class CpuBackend final : public Backend {
 public:
  CpuBackend(const CacheConfig& cfg, int64_t slots);
  ~CpuBackend() override;
  const char* name() const override { return "cpu"; }

  void append(int layer, const StepPlan& plan, const TensorView& k, const TensorView& v) override;
  void copy_chunk(int32_t src, int32_t dst, int32_t n_tokens) override;
  void attention(int layer, const StepPlan& plan, const TensorView& q, const TensorView& out,
                 const TensorView* lse) override;
  void read_tile(int layer, int32_t slot, int kv, int head, float* dst) const override;
  void update_digests(int layer, const int32_t* chunks, const int32_t* slots, size_t n,
                      DigestKind kind) override;
  void score_chunks(int layer, const TensorView& q, const ScoreRequest* requests, size_t count,
                    DigestKind kind) override;
  void read_digest(int layer, int32_t slot, int head, float* dst) const override;

  void open_host_tier() override;
  uint64_t backup(int layer, int32_t slot, void* host_dst) override;
  uint64_t backups_done() const override;
  void wait_backup(uint64_t ticket) override;
  void recall(int layer, int32_t slot, const void* host_src) override;
  void copy_chunk_layer(int layer, int32_t src, int32_t dst, int32_t n_tokens) override;

 private:
  uint8_t* tile(int layer, int32_t slot, int kv, int head) const;
  float* digest(int layer, int32_t slot, int head) const;

  CacheConfig cfg_;
  int64_t slots_;
  size_t elem_, tile_bytes_, slot_bytes_;
  std::vector<size_t> layer_offset_;    // bytes, layers + 1; layers that evict hold fewer slots
  uint8_t* pool_ = nullptr;
  std::unique_ptr<CpuBackupWorker> backups_;  // host tier only
  const KernelTable* kernels_;
  ThreadPool threads_;
  std::vector<KernelScratch> scratch_;  // one per thread
  ThreadCuts cuts_;  // the latest plan cut for threads_ (thread_cuts.h)
  std::vector<float> part_ml_, part_o_;
  mutable std::vector<float> digests_;  // [layers][slots][kv_heads][2][D], with eviction only
  std::vector<std::vector<float>> score_q_;  // per thread: pooled query, for scoring
  std::vector<std::pair<size_t, size_t>> score_items_;  // (request, first chunk) pieces
};

}  // namespace chunkvale
