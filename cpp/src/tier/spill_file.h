// The host tier's spill file: fixed-size blocks at index * block_bytes, owned by one cache
// only (an exclusive flock, across processes too; removed when the cache goes), with space
// reserved ahead (posix_fallocate) so that running out is reported while planning, and a
// checksum of every block kept in memory and verified on every read, so that a block the
// file does not hold as written (another writer, a bad disk) is an error, never K/V.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "test_faults.h"

namespace chunkvale {

class SpillFile {
 public:
  // Creates (or takes over and truncates) `path`. Throws ValueError naming
  // eviction.spill_path when it cannot be created, is not a regular file, or is in use by
  // another cache (in this process or another).
  SpillFile(const std::string& path, size_t block_bytes, TestFaults* faults = nullptr);
  ~SpillFile();  // removes the file, then releases it
  SpillFile(const SpillFile&) = delete;
  SpillFile& operator=(const SpillFile&) = delete;

  // Makes sure blocks [0, blocks) have disk space. Throws CapacityError naming
  // eviction.spill_path (ENOSPC and the like), or IOError.
  void reserve(int64_t blocks);
  // Writes one block; returns 0 or the errno of the failed write (the block's previous
  // checksum stays in place: a read still refuses whatever the file now holds).
  int write(int64_t index, const void* bytes);
  // Reads one block into dst and checks it against what write() stored. Throws IOError
  // naming eviction.spill_path on a read error or a mismatch.
  void read(int64_t index, void* dst);
  void forget(int64_t index);  // the block is free: no read is valid until the next write

  const std::string& path() const { return path_; }
  int64_t reserved_blocks() const { return reserved_; }

 private:
  std::string path_;
  size_t block_bytes_;
  TestFaults* faults_;
  int fd_ = -1;
  int64_t reserved_ = 0;
  uint64_t owner_;               // distinguishes this file's tags from any other's
  uint64_t next_generation_ = 1;
  struct Tag {
    uint64_t generation = 0;     // 0: nothing valid written
    uint64_t hash = 0;
  };
  std::vector<Tag> tags_;
  uint64_t block_hash(int64_t index, uint64_t generation, const void* bytes) const;
};

// A 64-bit hash of n bytes (word-wise multiply-rotate, then a final avalanche).
uint64_t hash_bytes(const void* p, size_t n, uint64_t seed);

}  // namespace chunkvale
