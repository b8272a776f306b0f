// CudaBackend: the device pool [layers][slots][2][kv_heads][C][head_dim] (one cudaMalloc),
// the plan's device copy, and the append / attention / merge / copy kernels. Every kernel
// runs on the caller's stream (cuda_api::thread_stream(), set by the bindings); nothing
// synchronises the host inside a step.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <vector>

#include "chunkvale/backend.h"
#include "device_plan.h"

namespace chunkvale {
namespace cuda {

class CudaBackend final : public Backend {
 public:
  CudaBackend(const CacheConfig& cfg, int64_t slots);
  ~CudaBackend() override;
  const char* name() const override { return "cuda"; }

  void append(int layer, const StepPlan& plan, const TensorView& k, const TensorView& v) override;
  void copy_chunk(int32_t src, int32_t dst, int32_t n_tokens) override;
  void attention(int layer, const StepPlan& plan, const TensorView& q, const TensorView& out,
                 const TensorView* lse) override;
  void read_tile(int layer, int32_t slot, int kv, int head, float* dst) const override;

  // Counters for tests and notes: plan uploads and their bytes.
  int64_t plan_uploads() const { return uploads_; }
  int64_t plan_upload_bytes() const { return upload_bytes_; }

 private:
  void use_device() const;
  cudaStream_t stream() const;
  void check_tensor(const TensorView& t, const char* arg) const;
  void ensure_plan(const StepPlan& plan, cudaStream_t s);  // refresh the device copy if stale
  void ensure_partials(int32_t p_tok, cudaStream_t s);
  void grow_device(void** ptr, size_t* cap, size_t need, cudaStream_t s, const char* what);
  size_t layer_offset(int layer) const;  // elements

  CacheConfig cfg_;
  int64_t slots_;
  int device_ = 0;
  int sm_count_ = 1;
  int items_per_sm_ = 8, min_piece_ = 4;  // CHUNKVALE_CUDA_ITEMS_PER_SM, CHUNKVALE_CUDA_MIN_PIECE (bench/gpu_sweep.py)
  size_t slot_stride_ = 0;  // elements
  void* pool_ = nullptr;

  // Plan: host pack, shadow of what the device holds, pinned staging (double), device copy.
  uint64_t plan_id_ = 0;
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
