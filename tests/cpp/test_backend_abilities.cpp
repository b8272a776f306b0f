// The backend's optional abilities are asked once: a config that needs one the backend lacks
// is refused naming the config field; the CPU backend has what its config asks for.
#include <memory>

#include "backend_factory.h"
#include "check.h"
#include "chunkvale/errors.h"

using namespace chunkvale;

namespace {

// The hot interface only: no digests, no copy engine.
struct NarrowBackend final : Backend, Inspect {
  const char* name() const override { return "narrow"; }
  void append(int, const StepPlan&, const TensorView&, const TensorView&, const ExecContext&) override {}
  void attention(int, const StepPlan&, const TensorView&, const TensorView&, const TensorView*,
                 const ExecContext&) override {}
  void attention_per_head(int, const StepPlan*, const TensorView&, const TensorView&, const TensorView*,
                          const ExecContext&) override {}
  void copy_chunk(int, int32_t, int32_t, int32_t, const ExecContext&) override {}
  const Inspect& inspect() const override { return *this; }
  void read_tile(int, int32_t, int, int, float*) const override {}
  void read_digest(int, int32_t, int, float*) const override {}
};

CacheConfig config(bool eviction, bool host_tier) {
  CacheConfig c;
  c.layers = 2, c.q_heads = 2, c.kv_heads = 1, c.head_dim = 64, c.chunk_size = 16, c.capacity_chunks = 8;
  c.threads = 1;
  if (eviction) {
    c.eviction.enabled = true;
    c.eviction.budget_tokens = 64;
    c.eviction.sink_chunks = 1, c.eviction.window_chunks = 1, c.eviction.topk_chunks = 1;
    if (host_tier) c.eviction.device_chunks = 4;
  }
  return c;
}

void absent_abilities_are_refused() {
  NarrowBackend b;
  require_abilities(config(false, false), b);  // needs nothing
  CHECK_THROWS(require_abilities(config(true, false), b), ValueError,
               "eviction: chunk digests are not implemented on the narrow backend");
  CHECK_THROWS(require_abilities(config(true, true), b), ValueError, "eviction");
}

void the_cpu_backend_has_what_its_config_asks() {
  for (int mode = 0; mode < 3; ++mode) {
    const CacheConfig cfg = config(mode > 0, mode > 1);
    std::unique_ptr<Backend> b = make_backend(cfg, cfg.capacity_chunks);
    require_abilities(cfg, *b);
    CHECK((b->digests() != nullptr) == cfg.eviction.enabled);
    CHECK((b->copy_engine() != nullptr) == cfg.eviction.host_tier());
  }
  // The host tier is asked of a backend that has digests but no copy engine: its own field.
  const CacheConfig digests_only = config(true, false);
  std::unique_ptr<Backend> b = make_backend(digests_only, 8);
  CHECK_THROWS(require_abilities(config(true, true), *b), ValueError,
               "eviction.device_chunks: the host tier is not implemented on the cpu backend");
}

}  // namespace

int main() {
  absent_abilities_are_refused();
  the_cpu_backend_has_what_its_config_asks();
  return finish("backend_abilities");
}
