#include "chunkvale/backend.h"

#include <string>

#include "chunkvale/errors.h"

namespace chunkvale {

namespace {
[[noreturn]] void unsupported(const Backend& b, const char* what) {
  throw ValueError(std::string("eviction: ") + what + " is not implemented on the " + b.name() +
                   " backend yet; construct the cache without eviction");
}
}  // namespace

void Backend::update_digests(int, const int32_t*, size_t, DigestKind) { unsupported(*this, "digest update"); }
void Backend::score_chunks(int, const TensorView&, const ScoreRequest*, size_t, DigestKind) {
  unsupported(*this, "chunk scoring");
}
void Backend::read_digest(int, int32_t, int, float*) const { unsupported(*this, "reading digests"); }

}  // namespace chunkvale
