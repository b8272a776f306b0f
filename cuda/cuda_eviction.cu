// CudaBackend's eviction half: digests and scoring kernels (digest_kernels.cuh), and the host
// tier's copies (a copy stream, pinned host memory, one event per backup ticket).
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

#include "chunkvale/errors.h"
#include "cuda_backend.h"
#include "cuda_check.h"
#include "digest_kernels.cuh"
#include "pool_kernels.cuh"

namespace chunkvale {
namespace cuda {

void CudaBackend::refuse_capture(cudaStream_t s, const char* what) const {
  if (is_capturing(s))
    throw ValueError(std::string("stream: ") + what +
                     " with eviction cannot run under CUDA graph capture: each step's chunk selection "
                     "is made on the host from scores copied back (and chunks move to and from the host "
                     "tier); capture a cache without eviction");
}

// ---- digests ----

void CudaBackend::update_digests(int layer, const int32_t* chunks, const int32_t* slots, size_t n,
                                 DigestKind kind) {
  if (!digests_) throw ValueError("eviction: digests are off for this cache");
  if (n == 0) return;
  DeviceGuard g(device_);
  cudaStream_t s = stream();
  refuse_capture(s, "update_digests");
  order_after_previous(s);
  score_pack_.assign(chunks, chunks + n);
  score_pack_.insert(score_pack_.end(), slots, slots + n);
  const int32_t* dev = static_cast<const int32_t*>(uploads_ring_.put(score_pack_.data(), score_pack_.size() * 4, s));
  DigestParams p;
  p.pool_layer = slot_ptr(layer, 0);
  p.digests_layer = digests_ + size_t(layer) * size_t(slots_) * cfg_.kv_heads * 2 * cfg_.head_dim;
  p.chunks = dev;
  p.slots = dev + n;
  p.slot_stride = int64_t(slot_stride_);
  p.kv_heads = cfg_.kv_heads;
  p.C = cfg_.chunk_size;
  p.D = cfg_.head_dim;
  p.kind = int(kind);
  const dim3 grid(unsigned(n), unsigned(cfg_.kv_heads));
  if (cfg_.dtype == DType::Float16)
    digest_kernel<__half><<<grid, kDigestThreads, 0, s>>>(p);
  else
    digest_kernel<__nv_bfloat16><<<grid, kDigestThreads, 0, s>>>(p);
  CV_CUDA(cudaGetLastError(), "digest kernel launch");
  record_done(s);
}

void CudaBackend::score_chunks(int layer, const TensorView& q, const ScoreRequest* requests, size_t count,
                               DigestKind kind) {
  if (!digests_) throw ValueError("eviction: digests are off for this cache");
  if (count == 0) return;
  DeviceGuard g(device_);
  check_tensor(q, "q");
  cudaStream_t s = stream();
  refuse_capture(s, "score_chunks");
  order_after_previous(s);
  // One upload: rows [count], then each candidate's request and chunk.
  size_t total = 0;
  for (size_t r = 0; r < count; ++r) total += requests[r].n;
  score_pack_.resize(count + 2 * total);
  int32_t* rows = score_pack_.data();
  int32_t* creq = rows + count;
  int32_t* cchunk = creq + total;
  for (size_t r = 0, c = 0; r < count; ++r) {
    rows[r] = requests[r].row;
    for (size_t i = 0; i < requests[r].n; ++i, ++c) {
      creq[c] = int32_t(r);
      cchunk[c] = requests[r].slots[i];
    }
  }
  const int32_t* dev = static_cast<const int32_t*>(uploads_ring_.put(score_pack_.data(), score_pack_.size() * 4, s));
  const size_t qs_bytes = count * size_t(cfg_.kv_heads) * qsum_stride(cfg_.head_dim) * 4;
  grow_device(reinterpret_cast<void**>(&qsum_), &qsum_cap_, qs_bytes, s, "query summary");
  grow_device(reinterpret_cast<void**>(&scores_dev_), &scores_dev_cap_, std::max<size_t>(total, 1) * 4, s, "scores");
  if (total * 4 > scores_host_cap_) {
    CV_CUDA(cudaStreamSynchronize(s), "cudaStreamSynchronize (score buffer growth)");
    if (scores_host_) CV_CUDA(cudaFreeHost(scores_host_), "cudaFreeHost");
    scores_host_ = nullptr;
    scores_host_cap_ = 0;
    const size_t cap = std::max(total * 6, size_t(4096));  // 1.5x, in bytes
    CV_CUDA(cudaMallocHost(reinterpret_cast<void**>(&scores_host_), cap), "cudaMallocHost (scores)");
    scores_host_cap_ = cap;
  }

  ScorePrepParams pp;
  pp.q = static_cast<const uint16_t*>(q.data);
  pp.rows = dev;
  pp.qsum = qsum_;
  pp.q_heads = cfg_.q_heads;
  pp.kv_heads = cfg_.kv_heads;
  pp.group = cfg_.group();
  pp.D = cfg_.head_dim;
  pp.kind = int(kind);
  if (cfg_.dtype == DType::Float16)
    score_prep_kernel<__half><<<unsigned(count), kDigestThreads, 0, s>>>(pp);
  else
    score_prep_kernel<__nv_bfloat16><<<unsigned(count), kDigestThreads, 0, s>>>(pp);
  CV_CUDA(cudaGetLastError(), "score prep kernel launch");
  if (total > 0) {
    ScoreParams sp;
    sp.digests_layer = digests_ + size_t(layer) * size_t(slots_) * cfg_.kv_heads * 2 * cfg_.head_dim;
    sp.qsum = qsum_;
    sp.cand_req = dev + count;
    sp.cand_chunk = dev + count + total;
    sp.scores = scores_dev_;
    sp.n = int64_t(total);
    sp.kv_heads = cfg_.kv_heads;
    sp.D = cfg_.head_dim;
    sp.kind = int(kind);
    const unsigned blocks = unsigned((total + kScoreWarps - 1) / kScoreWarps);
    score_kernel<<<blocks, kScoreWarps * 32, 0, s>>>(sp);
    CV_CUDA(cudaGetLastError(), "score kernel launch");
    CV_CUDA(cudaMemcpyAsync(scores_host_, scores_dev_, total * 4, cudaMemcpyDeviceToHost, s),
            "cudaMemcpyAsync (scores)");
  }
  record_done(s);
  // The core selects on the host: this is the step's one wait per scored layer.
  CV_CUDA(cudaStreamSynchronize(s), "cudaStreamSynchronize (scores)");
  for (size_t r = 0, c = 0; r < count; c += requests[r].n, ++r)
    std::memcpy(requests[r].scores, scores_host_ + c, requests[r].n * 4);
}

void CudaBackend::read_digest(int layer, int32_t slot, int head, float* dst) const {
  if (!digests_) throw ValueError("eviction: digests are off for this cache");
  DeviceGuard g(device_);
  const size_t D = size_t(cfg_.head_dim);
  const float* src = digests_ + ((size_t(layer) * size_t(slots_) + size_t(slot)) * cfg_.kv_heads + size_t(head)) * 2 * D;
  CV_CUDA(cudaDeviceSynchronize(), "cudaDeviceSynchronize (read_digest)");
  CV_CUDA(cudaMemcpy(dst, src, 2 * D * 4, cudaMemcpyDeviceToHost), "cudaMemcpy (read_digest)");
}

// ---- host tier ----

namespace {
void CUDART_CB sleep_on_stream(void* us) {  // test-only slow backups
  std::this_thread::sleep_for(std::chrono::microseconds(*static_cast<int*>(us)));
}
}  // namespace

void CudaBackend::open_host_tier() {
  DeviceGuard g(device_);
  CV_CUDA(cudaStreamCreateWithFlags(&copy_stream_, cudaStreamNonBlocking), "cudaStreamCreate (copy stream)");
  CV_CUDA(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming), "cudaEventCreate");
  // Test-only: delays every backup on the copy stream, so tests can catch a slot reused early.
  if (const char* d = std::getenv("CHUNKVALE_TEST_BACKUP_DELAY_US")) backup_delay_us_ = std::max(0, std::atoi(d));
}

HostMemory CudaBackend::host_memory() const {
  // Pinned and portable: copies to and from it are asynchronous DMA on any device.
  // Nothing captured: the host tier frees its slabs after the backend is gone.
  return {[](size_t n) -> void* {
            void* p = nullptr;
            if (cudaHostAlloc(&p, n, cudaHostAllocPortable) != cudaSuccess) {
              (void)cudaGetLastError();
              return nullptr;
            }
            return p;
          },
          [](void* p) { (void)cudaFreeHost(p); }};
}

uint64_t CudaBackend::backup(int layer, int32_t slot, void* host_dst) {
  DeviceGuard g(device_);
  cudaStream_t s = stream();
  refuse_capture(s, "backup");
  order_after_previous(s);
  // The copy starts once the caller's stream has written the slot.
  CV_CUDA(cudaEventRecord(ready_, s), "cudaEventRecord (backup ready)");
  CV_CUDA(cudaStreamWaitEvent(copy_stream_, ready_, 0), "cudaStreamWaitEvent (backup)");
  if (backup_delay_us_ > 0)
    CV_CUDA(cudaLaunchHostFunc(copy_stream_, sleep_on_stream, &backup_delay_us_), "cudaLaunchHostFunc");
  CV_CUDA(cudaMemcpyAsync(host_dst, slot_ptr(layer, slot), slot_stride_ * 2, cudaMemcpyDeviceToHost, copy_stream_),
          "cudaMemcpyAsync (backup)");
  cudaEvent_t e;
  if (free_events_.empty()) {
    CV_CUDA(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate (backup)");
  } else {
    e = free_events_.back();
    free_events_.pop_back();
  }
  cudaError_t err = cudaEventRecord(e, copy_stream_);
  if (err != cudaSuccess) {
    free_events_.push_back(e);
    throw_cuda(err, "cudaEventRecord (backup)");
  }
  in_flight_.push_back({++backups_issued_, e});
  return backups_issued_;
}

uint64_t CudaBackend::backups_done() const {
  // The copy stream runs in order: stop at the first backup still running.
  while (!in_flight_.empty()) {
    cudaError_t e = cudaEventQuery(in_flight_.front().done);
    if (e == cudaErrorNotReady) {
      (void)cudaGetLastError();
      break;
    }
    if (e != cudaSuccess) throw_cuda(e, "cudaEventQuery (backup)");
    backups_done_ = in_flight_.front().ticket;
    free_events_.push_back(in_flight_.front().done);
    in_flight_.pop_front();
  }
  return backups_done_;
}

void CudaBackend::wait_backup(uint64_t ticket) {
  DeviceGuard g(device_);
  while (backups_done_ < ticket && !in_flight_.empty()) {
    CV_CUDA(cudaEventSynchronize(in_flight_.front().done), "cudaEventSynchronize (backup)");
    backups_done_ = in_flight_.front().ticket;
    free_events_.push_back(in_flight_.front().done);
    in_flight_.pop_front();
  }
}

void CudaBackend::recall(int layer, int32_t slot, const void* host_src) {
  DeviceGuard g(device_);
  cudaStream_t s = stream();
  refuse_capture(s, "recall");
  order_after_previous(s);
  // Stream-ordered before the attention that reads it. A pinned source stays untouched
  // until then: the next backup into that host block waits for this stream first.
  CV_CUDA(cudaMemcpyAsync(slot_ptr(layer, slot), host_src, slot_stride_ * 2, cudaMemcpyHostToDevice, s),
          "cudaMemcpyAsync (recall)");
  record_done(s);
}

void CudaBackend::copy_chunk_layer(int layer, int32_t src, int32_t dst, int32_t n_tokens) {
  if (n_tokens <= 0 || src == dst) return;
  DeviceGuard g(device_);
  CopyParams cp;
  cp.pool = slot_ptr(layer, 0);
  cp.slot_stride = int64_t(slot_stride_);
  cp.layer_stride = 0;
  cp.tile = int64_t(cfg_.chunk_size) * cfg_.head_dim;
  cp.src = src;
  cp.dst = dst;
  cp.n_tokens = std::min(n_tokens, cfg_.chunk_size);
  cp.tiles_per_slot = 2 * cfg_.kv_heads;
  cp.layers = 1;
  cp.D = cfg_.head_dim;
  const int64_t work = int64_t(cp.tiles_per_slot) * cp.n_tokens * (cp.D / 8);
  cudaStream_t s = stream();
  order_after_previous(s);
  copy_chunk_kernel<<<grid_for(work, 256), 256, 0, s>>>(cp);
  CV_CUDA(cudaGetLastError(), "copy_chunk kernel launch");
  record_done(s);
}

}  // namespace cuda
}  // namespace chunkvale
