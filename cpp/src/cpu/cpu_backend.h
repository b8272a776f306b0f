// The CPU backend: owns the pool memory and runs the kernels on a thread pool.
#pragma once
#include <memory>
#include <vector>

#include "chunkvale/backend.h"
#include "cpu_executor.h"
#include "cpu_backup_worker.h"

namespace chunkvale {

// Every ability: digests when eviction is on, the copy engine (a worker thread) with the
// host tier. Runs synchronously: ExecContext is unused.
class CpuBackend final : public Backend, public Digests, public CopyEngine, public Inspect {
 public:
  CpuBackend(const CacheConfig& cfg, int64_t slots);
  ~CpuBackend() override;
  const char* name() const override { return "cpu"; }

  void append(int layer, const StepPlan& plan, const TensorView& k, const TensorView& v, const ExecContext&) override;
  void attention(int layer, const StepPlan& plan, const TensorView& q, const TensorView& out, const TensorView* lse,
                 const ExecContext&) override;
  void attention_per_head(int layer, const StepPlan* plans, const TensorView& q, const TensorView& out,
                          const TensorView* lse, const ExecContext&) override;
  void copy_chunk(int layer, int32_t src, int32_t dst, int32_t n_tokens, const ExecContext&) override;
  Digests* digests() override { return digests_.empty() ? nullptr : this; }
  CopyEngine* copy_engine() override { return backups_ ? this : nullptr; }
  const Inspect& inspect() const override { return *this; }

  // Digests (cpu_digests.cpp): scored by a kernel, ranked on the host (top_k.h).
  void update_digests(int layer, const int32_t* chunks, const int32_t* slots, size_t n, const ExecContext&) override;
  void top_chunks(int layer, const TensorView& q, const ScoreRequest* requests, size_t count, int k,
                  const ExecContext&) override;

  uint64_t backup(int layer, int32_t slot, void* host_dst, const ExecContext&) override;
  uint64_t backups_done() const override;
  void wait_backup(uint64_t ticket) override;
  void recall(int layer, int32_t slot, const void* host_src, const ExecContext&) override;

  void read_tile(int layer, int32_t slot, int kv, int head, float* dst) const override;
  void read_digest(int layer, int32_t slot, int head, float* dst) const override;

 private:
  // One layer of the pool, as the executor addresses it.
  LayerPool layer_pool(int layer) const;
  uint8_t* tile(int layer, int32_t slot, int kv, int head) const { return layer_pool(layer).tile(slot, kv, head); }
  LayerArgs layer_args(int layer, const TensorView& q, const TensorView& out, const TensorView* lse) const;
  float* digest(int layer, int32_t slot, int head) const;

  CacheConfig cfg_;
  int64_t slots_;
  size_t elem_, tile_bytes_, slot_bytes_;
  std::vector<size_t> layer_offset_;    // bytes, layers + 1; layers that evict hold fewer slots
  uint8_t* pool_ = nullptr;
  std::unique_ptr<CpuBackupWorker> backups_;  // host tier only
  CpuExecutor exec_;  // kernels, threads, the latest plan's cuts
  mutable std::vector<float> digests_;  // [layers][slots][kv_heads][2][D], with eviction only
};

}  // namespace chunkvale
