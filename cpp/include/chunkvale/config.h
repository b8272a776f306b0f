// Cache configuration: model shape, chunking, storage type and capacity.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace chunkvale {

enum class DType : uint8_t { Float32 = 0, Float16 = 1, BFloat16 = 2 };

const char* dtype_name(DType d);
size_t dtype_size(DType d);
DType parse_dtype(const std::string& name);  // "float32" | "float16" | "bfloat16"

struct CacheConfig {
  int layers = 0;
  int q_heads = 0;
  int kv_heads = 0;
  int head_dim = 0;
  int chunk_size = 32;          // tokens per chunk: a power of two in [16, 128]
  DType dtype = DType::Float32;
  int64_t capacity_chunks = 0;  // pool slots; or give capacity_bytes
  int64_t capacity_bytes = 0;
  int threads = 0;              // 0 = all hardware threads
  int share_threshold = 2;      // query rows needed to run a shared chunk chunk-first
  float sm_scale = 0.0f;        // 0 = 1/sqrt(head_dim)
  std::string device = "cpu";

  // Throws ValueError naming the first bad field.
  void validate() const;
  int group() const { return q_heads / kv_heads; }
  // Bytes one slot takes: every layer, K and V, every KV head.
  size_t bytes_per_chunk() const;
  int64_t resolved_capacity() const;
  float resolved_scale() const;
};

}  // namespace chunkvale
