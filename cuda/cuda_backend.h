// CudaBackend: the device pool [layers][slots][2][kv_heads][C][head_dim] (one cudaMalloc),
// the plan's device copy, and the append / attention / merge / copy kernels. Every kernel
// runs on the call's stream (ExecContext::stream, from the caller); nothing synchronises
// the host inside a step.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <deque>
#include <mutex>
#include <vector>

#include "chunkvale/backend.h"
#include "device_plan.h"
#include "upload_ring.h"

namespace chunkvale {
namespace cuda {

class CudaBackend final : public Backend, public Digests, public CopyEngine, public Inspect {
 public:
  CudaBackend(const CacheConfig& cfg, int64_t slots);
  ~CudaBackend() override;
  const char* name() const override { return "cuda"; }

  void append(int layer, const StepPlan& plan, const TensorView& k, const TensorView& v,
              const ExecContext& ctx) override;
  void attention(int layer, const StepPlan& plan, const TensorView& q, const TensorView& out, const TensorView* lse,
                 const ExecContext& ctx) override;
  void attention_per_head(int layer, const StepPlan* plans, const TensorView& q, const TensorView& out,
                          const TensorView* lse, const ExecContext& ctx) override;
  void copy_chunk(int layer, int32_t src, int32_t dst, int32_t n_tokens, const ExecContext& ctx) override;
  Digests* digests() override { return digests_ ? this : nullptr; }
  CopyEngine* copy_engine() override { return copy_stream_ ? this : nullptr; }
  const Inspect& inspect() const override { return *this; }

  // Eviction (cuda_eviction.cu): digests live on the device and are scored and ranked there;
  // the k best indices per request come back to the host, where the core plans the layer
  // (one stream synchronisation per scored layer and step).
  void update_digests(int layer, const int32_t* chunks, const int32_t* slots, size_t n,
                      const ExecContext& ctx) override;
  void top_chunks(int layer, const TensorView& q, const ScoreRequest* requests, size_t count, int k,
                  const ExecContext& ctx) override;
  // Host tier: backups on a copy stream into pinned memory, one event per ticket; recalls on
  // the call's stream. make_cuda_backend opens the copy stream when the config has a host tier.
  void open_host_tier();
  HostMemory host_memory() const override;
  uint64_t backup(int layer, int32_t slot, void* host_dst, const ExecContext& ctx) override;
  uint64_t backups_done() const override;
  void wait_backup(uint64_t ticket) override;
  void recall(int layer, int32_t slot, const void* host_src, const ExecContext& ctx) override;

  void read_tile(int layer, int32_t slot, int kv, int head, float* dst) const override;
  void read_digest(int layer, int32_t slot, int head, float* dst) const override;

  // Counters for tests and notes: plan uploads and their bytes.
  int64_t plan_uploads() const { return uploads_; }
  int64_t plan_upload_bytes() const { return upload_bytes_; }

 private:
  static cudaStream_t stream(const ExecContext& ctx) { return static_cast<cudaStream_t>(ctx.stream); }
  void check_tensor(const TensorView& t, const char* arg) const;
  void ensure_plan(const StepPlan& plan, cudaStream_t s);  // refresh the device copy if stale
  void ensure_partials(int32_t p_tok, cudaStream_t s);
  // attention's checks, then its stream ordered after this backend's previous work.
  cudaStream_t attention_stream(const TensorView& q, const TensorView& out, const TensorView* lse,
                                const ExecContext& ctx);
  // One plan's attention and merge: every KV head (head < 0) or KV head `head` alone.
  void attend(int layer, const StepPlan& plan, const TensorView& q, const TensorView& out, const TensorView* lse,
              int head, cudaStream_t s);
  void grow_device(void** ptr, size_t* cap, size_t need, cudaStream_t s, const char* what);
  size_t layer_offset(int layer) const { return layer_offset_[size_t(layer)]; }  // elements
  uint16_t* slot_ptr(int layer, int32_t slot) const;
  void refuse_capture(cudaStream_t s, const char* what) const;  // eviction needs the host each step

  CacheConfig cfg_;
  int64_t slots_;
  int device_ = 0;
  int sm_count_ = 1;
  int items_per_sm_ = 8, min_piece_ = 4;  // CHUNKVALE_CUDA_ITEMS_PER_SM, CHUNKVALE_CUDA_MIN_PIECE (bench/gpu_sweep.py)
  size_t slot_stride_ = 0;  // elements
  std::vector<size_t> layer_offset_;  // elements; layers that evict to the host hold fewer slots
  void* pool_ = nullptr;

  // Eviction: digests [layers][slots][kv_heads][2][D] float32, scoring buffers.
  float* digests_ = nullptr;
  UploadRing uploads_ring_;
  float* qsum_ = nullptr;
  size_t qsum_cap_ = 0;  // bytes
  float* scores_dev_ = nullptr;
  size_t scores_dev_cap_ = 0;
  int32_t* top_dev_ = nullptr;
  size_t top_dev_cap_ = 0;
  const int32_t* score_offsets_dev_ = nullptr;  // the last queue_scores' run offsets (topk_kernel's requests)
  void* results_host_ = nullptr;  // pinned: top-k indices coming back
  size_t results_host_cap_ = 0;
  std::vector<int32_t> score_pack_;
  size_t queue_scores(int layer, const TensorView& q, const ScoreRequest* requests, size_t count, cudaStream_t s);
  void* results_host(size_t bytes, cudaStream_t s);

  // Host tier: the copy stream, a ready event (the caller's stream reached the backup), one
  // event per ticket in flight (recycled), and the test-only delay per backup.
  cudaStream_t copy_stream_ = nullptr;
  cudaEvent_t ready_ = nullptr;
  struct Ticket {
    uint64_t ticket;
    cudaEvent_t done;
  };
  mutable std::deque<Ticket> in_flight_;
  mutable std::vector<cudaEvent_t> free_events_;
  mutable uint64_t backups_done_ = 0;
  uint64_t backups_issued_ = 0;
  int backup_delay_us_ = 0;

  // Plan: host pack, shadow of what the device holds, pinned staging (double), device copy.
  uint64_t plan_rev_ = 0;  // StepPlan::revision of the device copy
  bool plan_valid_ = false;
  std::vector<int32_t> pack_, shadow_;
  PlanLayout layout_, dev_layout_;
  bool dev_layout_valid_ = false;
  int32_t* staging_[2] = {nullptr, nullptr};
  size_t staging_cap_ = 0;  // words, each
  cudaEvent_t staging_done_[2] = {nullptr, nullptr};
  bool staging_pending_[2] = {false, false};
  int staging_next_ = 0;
  int32_t* dplan_ = nullptr;
  size_t dplan_cap_ = 0;  // bytes

  float* part_ml_ = nullptr;
  size_t part_ml_cap_ = 0;  // bytes
  float* part_o_ = nullptr;
  size_t part_o_cap_ = 0;

  int64_t uploads_ = 0, upload_bytes_ = 0;
  bool reference_kernel_ = false;  // CHUNKVALE_CUDA_KERNEL=reference (debugging)
  // Orders a call after the previous call's work when the caller switches streams (the
  // partial buffers and the plan copy are shared by every call of this cache).
  cudaEvent_t last_done_ = nullptr;
  cudaStream_t last_stream_ = nullptr;
  bool last_recorded_ = false;
  void order_after_previous(cudaStream_t s);
  void record_done(cudaStream_t s);
};

}  // namespace cuda
}  // namespace chunkvale
