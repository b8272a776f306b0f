// What a step is asked for (PlanEntry: one sequence's part of plan()) and what it needs of the
// cache's resources (StepNeeds); how many sequences one fork makes (kMaxForkChildren). Plain values, shared by the front (kv_cache.h) and the parts
// that decide on them (admission, the step planner), so that neither includes the other.
#pragma once
#include <cstdint>
#include <vector>

namespace chunkvale {

// The most children one fork() call makes (each copies its parent's token ids); a request's
// other samples are forked at once, so it bounds request_needs()'s n too.
constexpr int kMaxForkChildren = 4096;

// One batch entry of plan(): the next `count` pending prompt tokens, or explicit tokens.
struct PlanEntry {
  int64_t seq = 0;
  int64_t count = 0;              // used when `tokens` is empty
  std::vector<int32_t> tokens;    // tokens beyond the prompt (decode)
};

// What a step needs of each resource, against what it can have now (CapacityError's units:
// pool chunks; device chunks per evicting layer, both 0 without a host tier; host blocks,
// both 0 without one, host_available INT64_MAX when a spill file makes it unbounded).
struct StepNeeds {
  int64_t pool_chunks = 0, pool_available = 0;
  int64_t device_chunks = 0, device_available = 0;
  int64_t host_blocks = 0, host_available = 0;
  bool fits() const {
    return pool_chunks <= pool_available && device_chunks <= device_available && host_blocks <= host_available;
  }
};

}  // namespace chunkvale
