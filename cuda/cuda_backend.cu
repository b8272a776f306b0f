#include "cuda_backend.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>

#include "attention_kernels.cuh"
#include "pool_kernels.cuh"
#include "chunkvale/errors.h"
#include "cuda_check.h"

namespace chunkvale {

// ---- the runtime query behind cuda_device_count() (cuda_api.cpp) ----
int cuda_runtime_device_count() {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky-free error (no driver / no device)
    return 0;
  }
  return n;
}

namespace cuda {
namespace {

bool head_dim_supported(int D) {
#ifdef CHUNKVALE_CUDA_LEAN
  return D == 64 || D == 128 || D == 256;
#else
  return D == 64 || D == 80 || D == 96 || D == 128 || D == 256;
#endif
}

// cudaMalloc of a buffer sized by the pool: running out is the pool's CapacityError.
void* alloc_for_pool(size_t bytes, int64_t slots, const char* what) {
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, bytes);
  if (e == cudaSuccess) return p;
  (void)cudaGetLastError();
  throw CapacityError(Resource::PoolChunks, slots, 0,
                      "capacity: could not allocate " + std::to_string(bytes) + " bytes of GPU memory for " + what +
                          " (" + cudaGetErrorString(e) + "); lower capacity_chunks / capacity_bytes");
}

}  // namespace

CudaBackend::CudaBackend(const CacheConfig& cfg, int64_t slots) : cfg_(cfg), slots_(slots) {
  if (cfg.dtype == DType::Float32)
    throw TypeError("dtype: the CUDA backend stores float16 or bfloat16, got float32 "
                    "(use dtype='float16' or 'bfloat16' with device='cuda')");
  if (!head_dim_supported(cfg.head_dim))
    throw ValueError("head_dim: the CUDA backend has kernels for head_dim 64, 80, 96, 128, 256, got " +
                     std::to_string(cfg.head_dim));
  if (cfg.group() > 64)
    throw ValueError("q_heads: the CUDA backend supports up to 64 query heads per KV head, got " +
                     std::to_string(cfg.group()));
  if (cuda_runtime_device_count() == 0)
    throw ValueError("device: expected a usable CUDA GPU for device='cuda', found none "
                     "(cudaGetDeviceCount reports 0 devices or no driver)");
  CV_CUDA(cudaGetDevice(&device_), "cudaGetDevice");
  cudaDeviceProp prop;
  CV_CUDA(cudaGetDeviceProperties(&prop, device_), "cudaGetDeviceProperties");
  if (prop.major < 8)
    throw ValueError("device: the CUDA backend needs compute capability 8.0 or newer (mma.sync for "
                     "fp16/bf16), got " + std::to_string(prop.major) + "." + std::to_string(prop.minor) +
                     " (" + prop.name + ")");
  sm_count_ = prop.multiProcessorCount;
  slot_stride_ = size_t(PoolView::chunkvale_layout(cfg.kv_heads, cfg.chunk_size, cfg.head_dim).slot_elems());
  // `slots` is the logical capacity; layers that evict hold only their device slots.
  layer_offsets(cfg.layers, int64_t(slot_stride_), [&](int l) { return cfg.evicts_to_host(l) ? cfg.layer_slots(l) : slots; },
                layer_offset_);
  const size_t bytes = layer_offset_.back() * 2;
  pool_ = alloc_for_pool(bytes, slots, "the KV pool");
  try {
    CV_CUDA(cudaMemset(pool_, 0, bytes), "cudaMemset(pool)");
    if (cfg.eviction.enabled) {
      const size_t dbytes = size_t(DigestView{slots, cfg.kv_heads, cfg.head_dim}.layer(cfg.layers)) * 4;
      digests_ = static_cast<float*>(alloc_for_pool(dbytes, slots, "chunk digests"));
      CV_CUDA(cudaMemset(digests_, 0, dbytes), "cudaMemset(digests)");
    }
    // The memset runs on the legacy stream; a caller's non-blocking stream would not wait.
    CV_CUDA(cudaDeviceSynchronize(), "cudaDeviceSynchronize (pool init)");
    for (auto& ev : staging_done_) CV_CUDA(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreate");
    CV_CUDA(cudaEventCreateWithFlags(&last_done_, cudaEventDisableTiming), "cudaEventCreate");
  } catch (...) {
    for (auto& ev : staging_done_)
      if (ev) cudaEventDestroy(ev);
    if (last_done_) cudaEventDestroy(last_done_);
    if (digests_) cudaFree(digests_);
    cudaFree(pool_);
    throw;
  }
  // Tuning and debugging knobs, read once per cache (see docs/NOTES-cuda.md).
  const char* kern = std::getenv("CHUNKVALE_CUDA_KERNEL");
  reference_kernel_ = kern && std::string(kern) == "reference";
  if (const char* e = std::getenv("CHUNKVALE_CUDA_ITEMS_PER_SM")) items_per_sm_ = std::max(1, std::atoi(e));
  if (const char* e = std::getenv("CHUNKVALE_CUDA_MIN_PIECE")) min_piece_ = std::max(1, std::atoi(e));
}

void CudaBackend::order_after_previous(cudaStream_t s) {
  if (last_recorded_ && s != last_stream_ && !is_capturing(s))
    CV_CUDA(cudaStreamWaitEvent(s, last_done_, 0), "cudaStreamWaitEvent");
}

void CudaBackend::record_done(cudaStream_t s) {
  if (is_capturing(s)) {
    last_recorded_ = false;
    return;
  }
  CV_CUDA(cudaEventRecord(last_done_, s), "cudaEventRecord");
  last_stream_ = s;
  last_recorded_ = true;
}

CudaBackend::~CudaBackend() {
  // Errors are ignored: at process exit the context may already be gone.
  (void)cudaSetDevice(device_);
  (void)cudaDeviceSynchronize();
  for (auto& ev : staging_done_)
    if (ev) (void)cudaEventDestroy(ev);
  if (last_done_) (void)cudaEventDestroy(last_done_);
  for (auto& st : staging_)
    if (st) (void)cudaFreeHost(st);
  if (dplan_) (void)cudaFree(dplan_);
  if (part_ml_) (void)cudaFree(part_ml_);
  if (part_o_) (void)cudaFree(part_o_);
  if (pool_) (void)cudaFree(pool_);
  if (digests_) (void)cudaFree(digests_);
  if (qsum_) (void)cudaFree(qsum_);
  if (scores_dev_) (void)cudaFree(scores_dev_);
  if (top_dev_) (void)cudaFree(top_dev_);
  if (results_host_) (void)cudaFreeHost(results_host_);
  if (ready_) (void)cudaEventDestroy(ready_);
  for (const Ticket& t : in_flight_) (void)cudaEventDestroy(t.done);
  for (cudaEvent_t e : free_events_) (void)cudaEventDestroy(e);
  if (copy_stream_) (void)cudaStreamDestroy(copy_stream_);
  (void)cudaGetLastError();
}

uint16_t* CudaBackend::slot_ptr(int layer, int32_t slot) const {
  return static_cast<uint16_t*>(pool_) + layer_offset(layer) + size_t(slot) * slot_stride_;
}

void CudaBackend::check_tensor(const TensorView& t, const char* arg) const {
  if (t.device_id != device_)
    throw ValueError(std::string(arg) + ": expected a tensor on cuda:" + std::to_string(device_) +
                     " (the cache's GPU), got cuda:" + std::to_string(t.device_id));
  if (reinterpret_cast<uintptr_t>(t.data) % 16 != 0)
    throw ValueError(std::string(arg) + ": expected data aligned to 16 bytes on the GPU, got an offset view "
                     "(pass a fresh or .contiguous() tensor)");
}

void CudaBackend::grow_device(void** ptr, size_t* cap, size_t need, cudaStream_t s, const char* what) {
  if (need <= *cap) return;
  if (is_capturing(s))
    throw ValueError(std::string("stream: the CUDA backend must grow its ") + what +
                     " buffer, which cannot happen during CUDA graph capture; run one step of the "
                     "same or a larger shape before capturing");
  size_t n = std::max(need + need / 2, size_t(64) * 1024);
  CV_CUDA(cudaDeviceSynchronize(), "cudaDeviceSynchronize (buffer growth)");
  if (*ptr) CV_CUDA(cudaFree(*ptr), "cudaFree");
  *ptr = nullptr;
  *cap = 0;
  cudaError_t e = cudaMalloc(ptr, n);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    *ptr = nullptr;
    // GPU memory is what pool chunks are made of; no admission rule counts these buffers.
    throw CapacityError(Resource::PoolChunks, 1, 0, std::string("could not allocate ") + std::to_string(n) + " bytes of GPU memory for the " +
                        what + " buffer (" + cudaGetErrorString(e) + ")");
  }
  *cap = n;
}

void CudaBackend::ensure_plan(const StepPlan& plan, cudaStream_t s) {
  if (plan_valid_ && plan.revision == plan_rev_) return;
  plan_valid_ = false;
  PlanBuildParams bp = PlanBuildParams::for_cache(cfg_, sm_count_);
  bp.items_per_sm = items_per_sm_;
  bp.min_piece = min_piece_;
  try {
    build_device_plan(plan, bp, pack_, layout_);
  } catch (const std::invalid_argument& e) {
    throw ValueError(e.what());
  }
  const bool capturing = is_capturing(s);
  const size_t n = pack_.size();
  ensure_partials(layout_.p_tok, s);  // before anything marks this plan as uploaded

  if (n * 4 > dplan_cap_) {
    grow_device(reinterpret_cast<void**>(&dplan_), &dplan_cap_, n * 4, s, "plan");
    dev_layout_valid_ = false;
  }
  // Copy only the words that differ from what the device holds (a decode step that only
  // bumps lengths changes the trailing chunk_valid / positions sections).
  size_t first = 0, last = n;
  if (dev_layout_valid_ && layout_ == dev_layout_ && shadow_.size() == n) {
    while (first < n && pack_[first] == shadow_[first]) ++first;
    while (last > first && pack_[last - 1] == shadow_[last - 1]) --last;
  }
  if (last > first) {
    if (n > staging_cap_) {
      if (capturing)
        throw ValueError("stream: the CUDA backend must grow its pinned plan staging buffer, which cannot "
                         "happen during CUDA graph capture; run one step of the same shape before capturing");
      for (int k = 0; k < 2; ++k) {
        if (staging_pending_[k]) CV_CUDA(cudaEventSynchronize(staging_done_[k]), "cudaEventSynchronize");
        staging_pending_[k] = false;
        if (staging_[k]) CV_CUDA(cudaFreeHost(staging_[k]), "cudaFreeHost");
        staging_[k] = nullptr;
      }
      staging_cap_ = 0;
      const size_t cap = std::max(n + n / 2, size_t(16) * 1024);
      for (int k = 0; k < 2; ++k)
        CV_CUDA(cudaMallocHost(reinterpret_cast<void**>(&staging_[k]), cap * 4), "cudaMallocHost (plan staging)");
      staging_cap_ = cap;
    }
    // Double-buffered staging: the buffer written now was last used two uploads ago; its
    // copy has almost surely run, the event wait only guards the host running far ahead.
    const int k = staging_next_;
    staging_next_ ^= 1;
    if (staging_pending_[k]) {
      CV_CUDA(cudaEventSynchronize(staging_done_[k]), "cudaEventSynchronize (plan staging)");
      staging_pending_[k] = false;
    }
    std::memcpy(staging_[k] + first, pack_.data() + first, (last - first) * 4);
    CV_CUDA(cudaMemcpyAsync(dplan_ + first, staging_[k] + first, (last - first) * 4, cudaMemcpyHostToDevice, s),
            "cudaMemcpyAsync (plan)");
    if (!capturing) {
      CV_CUDA(cudaEventRecord(staging_done_[k], s), "cudaEventRecord");
      staging_pending_[k] = true;
    }
    ++uploads_;
    upload_bytes_ += int64_t(last - first) * 4;
  }
  shadow_.swap(pack_);
  dev_layout_ = layout_;
  // A captured copy has not run yet: the next plan is uploaded whole.
  dev_layout_valid_ = !capturing;
  plan_rev_ = plan.revision;
  plan_valid_ = true;
}

void CudaBackend::ensure_partials(int32_t p_tok, cudaStream_t s) {
  const size_t rows = size_t(p_tok) * cfg_.group() * cfg_.kv_heads;
  grow_device(reinterpret_cast<void**>(&part_ml_), &part_ml_cap_, std::max<size_t>(rows, 1) * 2 * 4, s, "partial (max, sum)");
  grow_device(reinterpret_cast<void**>(&part_o_), &part_o_cap_, std::max<size_t>(rows, 1) * cfg_.head_dim * 4, s,
              "partial output");
}

void CudaBackend::append(int layer, const StepPlan& plan, const TensorView& k, const TensorView& v,
                         const ExecContext& ctx) {
  DeviceGuard g(device_);
  check_tensor(k, "k");
  check_tensor(v, "v");
  cudaStream_t s = stream(ctx);
  if (cfg_.eviction.enabled) refuse_capture(s, "append");
  order_after_previous(s);
  ensure_plan(plan, s);
  if (plan.num_tokens == 0) return;
  AppendParams ap;
  ap.pool_layer = static_cast<uint16_t*>(pool_) + layer_offset(layer);
  ap.k = k.data;
  ap.v = v.data;
  ap.row_slot = dplan_ + dev_layout_.row_slot;
  ap.positions = dplan_ + dev_layout_.positions;
  ap.pool = PoolView::chunkvale_layout(cfg_.kv_heads, cfg_.chunk_size, cfg_.head_dim);
  ap.num_tokens = plan.num_tokens;
  ap.kv_heads = cfg_.kv_heads;
  ap.C = cfg_.chunk_size;
  ap.D = cfg_.head_dim;
  const int64_t work = int64_t(plan.num_tokens) * cfg_.kv_heads * (cfg_.head_dim / 8);
  append_kernel<<<grid_for(work, 256), 256, 0, s>>>(ap);
  CV_CUDA(cudaGetLastError(), "append kernel launch");
  record_done(s);
}

void CudaBackend::copy_chunk(int layer, int32_t src, int32_t dst, int32_t n_tokens, const ExecContext& ctx) {
  if (n_tokens <= 0 || src == dst) return;
  const bool all = layer == kAllLayers;
  if (all && cfg_.eviction.host_tier()) {  // layers hold different slot counts: no common stride
    for (int l = 0; l < cfg_.layers; ++l) copy_chunk(l, src, dst, n_tokens, ctx);
    return;
  }
  DeviceGuard g(device_);
  CopyParams cp;
  cp.pool = all ? static_cast<uint16_t*>(pool_) : slot_ptr(layer, 0);
  cp.view = PoolView::chunkvale_layout(cfg_.kv_heads, cfg_.chunk_size, cfg_.head_dim);
  cp.layer_stride = all ? int64_t(slots_) * int64_t(slot_stride_) : 0;
  cp.src = src;
  cp.dst = dst;
  cp.n_tokens = std::min(n_tokens, cfg_.chunk_size);
  cp.layers = all ? cfg_.layers : 1;
  cp.kv_heads = cfg_.kv_heads;
  const int64_t work = int64_t(cp.layers) * 2 * cp.kv_heads * cp.n_tokens * (cfg_.head_dim / 8);
  cudaStream_t s = stream(ctx);
  order_after_previous(s);
  copy_chunk_kernel<<<grid_for(work, 256), 256, 0, s>>>(cp);
  CV_CUDA(cudaGetLastError(), "copy_chunk kernel launch");
  record_done(s);
}

void CudaBackend::attention(int layer, const StepPlan& plan, const TensorView& q, const TensorView& out,
                            const TensorView* lse, const ExecContext& ctx) {
  DeviceGuard g(device_);
  cudaStream_t s = attention_stream(q, out, lse, ctx);
  attend(layer, plan, q, out, lse, -1, s);
  record_done(s);
}

void CudaBackend::attention_per_head(int layer, const StepPlan* plans, const TensorView& q, const TensorView& out,
                                     const TensorView* lse, const ExecContext& ctx) {
  DeviceGuard g(device_);
  cudaStream_t s = attention_stream(q, out, lse, ctx);
  // One run per KV head, each over its own plan: the plan's device copy and the partials are
  // reused in stream order.
  for (int h = 0; h < cfg_.kv_heads; ++h) attend(layer, plans[h], q, out, lse, h, s);
  record_done(s);
}

cudaStream_t CudaBackend::attention_stream(const TensorView& q, const TensorView& out, const TensorView* lse,
                                           const ExecContext& ctx) {
  check_tensor(q, "q");
  check_tensor(out, "out");
  if (lse && lse->device_id != device_)
    throw ValueError("lse: expected a tensor on cuda:" + std::to_string(device_) + ", got cuda:" +
                     std::to_string(lse->device_id));
  cudaStream_t s = stream(ctx);
  if (cfg_.eviction.enabled) refuse_capture(s, "attention");
  order_after_previous(s);
  return s;
}

// Attention and merge of one plan on s: every KV head (head < 0), or KV head `head` alone as a
// cache of one KV head (its pool tiles, query and output heads at that head's offsets).
void CudaBackend::attend(int layer, const StepPlan& plan, const TensorView& q, const TensorView& out,
                         const TensorView* lse, int head, cudaStream_t s) {
  ensure_plan(plan, s);
  if (plan.num_tokens == 0) return;
  const PlanLayout& L = dev_layout_;
  const int G = cfg_.group(), D = cfg_.head_dim;
  const PoolView pool = PoolView::chunkvale_layout(cfg_.kv_heads, cfg_.chunk_size, D);

  AttnParams ap;
  ap.pool_layer = static_cast<const uint16_t*>(pool_) + layer_offset(layer);
  ap.q = q.data;
  ap.items = reinterpret_cast<const DevItem*>(dplan_ + L.items);
  ap.chunk_slot = dplan_ + L.chunk_slot;
  ap.chunk_start = dplan_ + L.chunk_start;
  ap.chunk_valid = dplan_ + L.chunk_valid;
  ap.unit_rows = dplan_ + L.unit_rows;
  ap.positions = dplan_ + L.positions;
  ap.part_ml = part_ml_;
  ap.part_o = part_o_;
  ap.pool = pool;
  ap.C = cfg_.chunk_size;
  ap.kv_heads = cfg_.kv_heads;
  ap.q_heads = cfg_.q_heads;
  ap.group = G;
  ap.p_tok = L.p_tok;
  ap.scale_log2 = cfg_.resolved_scale() * 1.4426950408889634f;
  MergeParams mp;
  mp.row_off = dplan_ + L.row_off;
  mp.row_parts = dplan_ + L.row_parts;
  mp.part_ml = part_ml_;
  mp.part_o = part_o_;
  mp.out = out.data;
  mp.lse = lse ? static_cast<float*>(lse->data) : nullptr;
  mp.num_tokens = plan.num_tokens;
  mp.q_heads = cfg_.q_heads;
  mp.group = G;
  mp.p_tok = L.p_tok;
  mp.D = D;
  mp.out_heads = cfg_.q_heads;
  mp.head0 = 0;
  if (head >= 0) restrict_to_head(ap, mp, head, pool.head_stride);
  if (L.n_items > 0 && reference_kernel_) {
    const dim3 grid(unsigned(L.n_items), unsigned(ap.kv_heads));
    if (cfg_.dtype == DType::Float16)
      reference_attention_kernel<__half><<<grid, kThreads, 0, s>>>(ap, D);
    else
      reference_attention_kernel<__nv_bfloat16><<<grid, kThreads, 0, s>>>(ap, D);
    CV_CUDA(cudaGetLastError(), "reference attention kernel launch");
  } else if (L.n_items > 0) {
    cudaError_t e = cfg_.dtype == DType::Float16 ? launch_attention_f16(ap, D, L.n_items, s)
                                                 : launch_attention_bf16(ap, D, L.n_items, s);
    CV_CUDA(e, "attention kernel launch");
  }

  const unsigned blocks = unsigned(int64_t(plan.num_tokens) * mp.q_heads);  // one CTA per (row, head)
  if (blocks > 0) {
    if (cfg_.dtype == DType::Float16)
      merge_kernel<__half><<<blocks, 128, 0, s>>>(mp);
    else
      merge_kernel<__nv_bfloat16><<<blocks, 128, 0, s>>>(mp);
    CV_CUDA(cudaGetLastError(), "merge kernel launch");
  }
}

}  // namespace cuda

std::unique_ptr<Backend> make_cuda_backend(const CacheConfig& cfg, int64_t slots) {
  auto b = std::make_unique<cuda::CudaBackend>(cfg, slots);
  if (cfg.eviction.host_tier()) b->open_host_tier();  // the copy engine (b cleans up if this throws)
  return b;
}

}  // namespace chunkvale
