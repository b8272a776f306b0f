// The digest of one chunk's keys for one KV head: two float32 D-vectors whose meaning the
// kind gives (docs/API.md; tests/reference.py digest_reference). One definition for every
// store that computes digests on the host: CpuBackend's pool and a caller's paged pool.
#pragma once
#include "chunkvale/config.h"

namespace chunkvale {

// keys: [rows][D] float32 (a full chunk). Writes lo[D] and hi[D].
void key_digest(DigestKind kind, const float* keys, int rows, int D, float* lo, float* hi);

}  // namespace chunkvale
