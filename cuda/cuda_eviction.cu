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
                                 const ExecContext& ctx) {
  if (!digests_) throw ValueError("eviction: digests are off for this cache");
  if (n == 0) return;
  DeviceGuard g(device_);
  cudaStream_t s = stream(ctx);
  refuse_capture(s, "update_digests");
  order_after_previous(s);
  score_pack_.assign(chunks, chunks + n);
  score_pack_.insert(score_pack_.end(), slots, slots + n);
  const int32_t* dev = static_cast<const int32_t*>(uploads_ring_.put(score_pack_.data(), score_pack_.size() * 4, s));
  DigestParams p;
  p.pool_layer = slot_ptr(layer, 0);
  p.digests_layer = digests_ + DigestView{slots_, cfg_.kv_heads, cfg_.head_dim}.layer(layer);
  p.chunks = dev;
  p.slots = dev + n;
  p.pool = PoolView::chunkvale_layout(cfg_.kv_heads, cfg_.chunk_size, cfg_.head_dim);
  p.kv_heads = cfg_.kv_heads;
  p.C = cfg_.chunk_size;
  p.D = cfg_.head_dim;
  p.kind = int(cfg_.eviction.digest);
  const dim3 grid(unsigned(n), unsigned(cfg_.kv_heads));
  if (cfg_.dtype == DType::Float16)
    digest_kernel<__half><<<grid, kDigestThreads, 0, s>>>(p);
  else
    digest_kernel<__nv_bfloat16><<<grid, kDigestThreads, 0, s>>>(p);
  CV_CUDA(cudaGetLastError(), "digest kernel launch");
  record_done(s);
}

// Uploads the requests (rows, offsets, each candidate's request and chunk) and queues the
// score kernels on s; the scores land in scores_dev_, ranked by topk_kernel over the runs
// score_offsets_dev_ bounds: one per request, or with per-KV-head selection one per
// (request, KV head) (score_heads_kernel's layout). Returns the runs.
size_t CudaBackend::queue_scores(int layer, const TensorView& q, const ScoreRequest* requests, size_t count,
                                 cudaStream_t s) {
  const bool per_head = cfg_.eviction.per_kv_head();
  const size_t KV = size_t(cfg_.kv_heads), units = per_head ? KV : 1;
  size_t total = 0;
  for (size_t r = 0; r < count; ++r) total += requests[r].n;
  score_pack_.resize(2 * count + 1 + 2 * total + (per_head ? count * KV + 1 : 0));
  int32_t* rows = score_pack_.data();
  int32_t* off = rows + count;
  int32_t* creq = off + count + 1;
  int32_t* cchunk = creq + total;
  int32_t* runs = cchunk + total;  // per-head runs' offsets
  off[0] = 0;
  for (size_t r = 0, c = 0; r < count; ++r) {
    rows[r] = requests[r].row;
    for (size_t i = 0; i < requests[r].n; ++i, ++c) {
      creq[c] = int32_t(r);
      cchunk[c] = requests[r].slots[i];
    }
    off[r + 1] = int32_t(c);
  }
  if (per_head) {
    for (size_t r = 0; r < count; ++r)
      for (size_t g = 0; g < KV; ++g) runs[r * KV + g] = int32_t(size_t(off[r]) * KV + g * requests[r].n);
    runs[count * KV] = int32_t(total * KV);
  }
  const int32_t* dev = static_cast<const int32_t*>(uploads_ring_.put(score_pack_.data(), score_pack_.size() * 4, s));
  const int32_t* dev_off = dev + count;
  score_offsets_dev_ = per_head ? runs - score_pack_.data() + dev : dev_off;
  // Per-KV-head selection summarises each query head alone (group 1), shared each group.
  const int prep_heads = per_head ? cfg_.q_heads : cfg_.kv_heads;
  const size_t qs_bytes = count * size_t(prep_heads) * qsum_stride(cfg_.head_dim) * 4;
  grow_device(reinterpret_cast<void**>(&qsum_), &qsum_cap_, qs_bytes, s, "query summary");
  grow_device(reinterpret_cast<void**>(&scores_dev_), &scores_dev_cap_, std::max<size_t>(total * units, 1) * 4, s,
              "scores");

  ScorePrepParams pp;
  pp.q = static_cast<const uint16_t*>(q.data);
  pp.rows = dev;
  pp.qsum = qsum_;
  pp.q_heads = cfg_.q_heads;
  pp.kv_heads = prep_heads;
  pp.group = per_head ? 1 : cfg_.group();
  pp.D = cfg_.head_dim;
  pp.kind = int(cfg_.eviction.digest);
  const dim3 prep_grid{unsigned(count), unsigned(prep_heads)};
  if (cfg_.dtype == DType::Float16)
    score_prep_kernel<__half><<<prep_grid, kDigestThreads, 0, s>>>(pp);
  else
    score_prep_kernel<__nv_bfloat16><<<prep_grid, kDigestThreads, 0, s>>>(pp);
  CV_CUDA(cudaGetLastError(), "score prep kernel launch");
  if (total > 0) {
    ScoreParams sp;
    sp.digests_layer = digests_ + DigestView{slots_, cfg_.kv_heads, cfg_.head_dim}.layer(layer);
    sp.qsum = qsum_;
    sp.cand_req = creq - score_pack_.data() + dev;
    sp.cand_chunk = cchunk - score_pack_.data() + dev;
    sp.scores = scores_dev_;
    sp.n = int64_t(total);
    sp.kv_heads = cfg_.kv_heads;
    sp.D = cfg_.head_dim;
    sp.kind = int(cfg_.eviction.digest);
    if (per_head) {
      ScoreHeadsParams hp;
      static_cast<ScoreParams&>(hp) = sp;
      hp.req_off = dev_off;
      hp.group = cfg_.group();
      const unsigned blocks = unsigned((total * KV + kScoreWarps - 1) / kScoreWarps);
      score_heads_kernel<<<blocks, kScoreWarps * 32, 0, s>>>(hp);
      CV_CUDA(cudaGetLastError(), "per-head score kernel launch");
    } else {
      const unsigned blocks = unsigned((total + kScoreWarps - 1) / kScoreWarps);
      score_kernel<<<blocks, kScoreWarps * 32, 0, s>>>(sp);
      CV_CUDA(cudaGetLastError(), "score kernel launch");
    }
  }
  return count * units;
}

// Pinned host memory for the top-k indices coming back (grows; the stream is idle when it does).
void* CudaBackend::results_host(size_t bytes, cudaStream_t s) {
  if (bytes > results_host_cap_) {
    CV_CUDA(cudaStreamSynchronize(s), "cudaStreamSynchronize (result buffer growth)");
    if (results_host_) CV_CUDA(cudaFreeHost(results_host_), "cudaFreeHost");
    results_host_ = nullptr;
    results_host_cap_ = 0;
    const size_t cap = std::max(bytes + bytes / 2, size_t(4096));
    CV_CUDA(cudaMallocHost(&results_host_, cap), "cudaMallocHost (results)");
    results_host_cap_ = cap;
  }
  return results_host_;
}

void CudaBackend::top_chunks(int layer, const TensorView& q, const ScoreRequest* requests, size_t count, int k,
                             const ExecContext& ctx) {
  if (!digests_) throw ValueError("eviction: digests are off for this cache");
  if (count == 0 || k <= 0) return;
  DeviceGuard g(device_);
  check_tensor(q, "q");
  cudaStream_t s = stream(ctx);
  refuse_capture(s, "top_chunks");
  order_after_previous(s);
  const size_t runs = queue_scores(layer, q, requests, count, s), units = runs / count;
  const size_t n_top = runs * size_t(k);
  grow_device(reinterpret_cast<void**>(&top_dev_), &top_dev_cap_, n_top * 4, s, "top-k");
  TopKParams tp;
  tp.scores = scores_dev_;
  tp.req_off = score_offsets_dev_;
  tp.top = top_dev_;
  tp.k = k;
  topk_kernel<<<unsigned(runs), kTopKThreads, 0, s>>>(tp);
  CV_CUDA(cudaGetLastError(), "top-k kernel launch");
  int32_t* host = static_cast<int32_t*>(results_host(n_top * 4, s));
  CV_CUDA(cudaMemcpyAsync(host, top_dev_, n_top * 4, cudaMemcpyDeviceToHost, s), "cudaMemcpyAsync (top-k)");
  record_done(s);
  // The core selects on the host: the step's one wait per scored layer, for k indices per run
  // (a request's runs in order: its KV heads' lists with per-KV-head selection).
  CV_CUDA(cudaStreamSynchronize(s), "cudaStreamSynchronize (top-k)");
  for (size_t r = 0; r < count; ++r)
    for (size_t u = 0; u < units; ++u)
      std::memcpy(requests[r].top + u * size_t(k), host + (r * units + u) * size_t(k),
                  std::min<size_t>(size_t(k), requests[r].n) * 4);
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
  backup_delay_us_ = cfg_.test_hooks.backup_delay_us;
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

uint64_t CudaBackend::backup(int layer, int32_t slot, void* host_dst, const ExecContext& ctx) {
  DeviceGuard g(device_);
  cudaStream_t s = stream(ctx);
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

void CudaBackend::recall(int layer, int32_t slot, const void* host_src, const ExecContext& ctx) {
  DeviceGuard g(device_);
  cudaStream_t s = stream(ctx);
  refuse_capture(s, "recall");
  order_after_previous(s);
  // Stream-ordered before the attention that reads it. A pinned source stays untouched
  // until then: the next backup into that host block waits for this stream first.
  CV_CUDA(cudaMemcpyAsync(slot_ptr(layer, slot), host_src, slot_stride_ * 2, cudaMemcpyHostToDevice, s),
          "cudaMemcpyAsync (recall)");
  record_done(s);
}

}  // namespace cuda
}  // namespace chunkvale
