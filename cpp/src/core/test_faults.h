// Test-only fault injection for the host tier (CacheConfig::test_hooks.faults, injected by the
// tests that construct a cache with it), so tests can prove that every storage failure surfaces as a clear error and
// that no sequence's K/V is ever replaced by another's. Not for production use.
//
// The spec is a comma-separated list of OP=ERRNO@SKIP[xCOUNT]: after SKIP successful
// operations of kind OP, the next COUNT (default: all) fail with ERRNO (a name such as ENOSPC
// or EIO). OP is one of
//   write      pwrite of a block to the spill file
//   read       pread of a block from the spill file
//   fallocate  reserving spill file space (plan)
//   alloc      host memory for the host tier (slabs, staging buffers); ERRNO is ignored
// e.g. "write=EIO@3x2,alloc=ENOMEM@10".
#pragma once
#include <cstdint>
#include <string>

namespace chunkvale {

class FaultPoint {
 public:
  FaultPoint() = default;
  FaultPoint(int err, int64_t skip, int64_t count) : err_(err), skip_(skip), count_(count) {}
  // 0: let this operation run; otherwise the errno it must fail with.
  int next();
  bool armed() const { return err_ != 0; }

 private:
  int err_ = 0;
  int64_t skip_ = 0, count_ = -1;  // count -1: every later operation fails
};

struct TestFaults {
  FaultPoint write, read, fallocate, alloc;
  // Parses a spec (empty: no faults). Throws ValueError naming test_hooks.faults.
  static TestFaults parse(const std::string& spec);
};

}  // namespace chunkvale
