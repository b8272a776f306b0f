// The host tier's store: fixed-size blocks (one chunk of one layer each) in host memory
// up to a byte limit, and past it, when a spill file is configured, in that file.
// Backups land in a block's host memory directly; a block in the file gets a staging
// buffer that is written to the file once its backup completed (settle()).
// A failed write keeps the block staged (its bytes stay readable, nothing is lost) and is
// reported by check() at the cache's next call. Reads of the file are checked against a
// checksum (spill_file.h). Only the core's thread touches it (under the cache's lock).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "chunkvale/backend.h"
#include "spill_file.h"
#include "test_faults.h"

namespace chunkvale {

class HostTier {
 public:
  // ram_bytes: 0 = unbounded; spill_path: "" = no file. Throws ValueError naming
  // eviction.spill_path when the file can't be created or is in use. `faults`: test-only
  // injected failures (test_faults.h).
  HostTier(size_t block_bytes, int64_t ram_bytes, const std::string& spill_path,
           HostMemory memory = plain_host_memory(), TestFaults faults = {});
  ~HostTier();
  HostTier(const HostTier&) = delete;
  HostTier& operator=(const HostTier&) = delete;

  // A free block, or -1 when host memory is full and there is no spill file.
  int64_t alloc();
  void free(int64_t block);  // its backup must have completed
  // Blocks alloc() can still hand out (INT64_MAX when unbounded).
  int64_t available() const;
  // Allocates up front the memory that the next n alloc() + backup_target() need (RAM blocks,
  // then spill staging, and the spill file's disk space), so that running out is reported
  // before a step changes anything. Throws CapacityError naming eviction.host_bytes /
  // eviction.spill_path.
  void reserve(int64_t n);
  // Throws (CapacityError for a full disk, IOError otherwise, naming eviction.spill_path)
  // if a write to the spill file failed since the last check; the failed blocks stay staged
  // and are written again at the next settle().
  void check();

  // Where a backup of this block must be copied to; then say its ticket.
  void* backup_target(int64_t block);
  void backup_queued(int64_t block, uint64_t ticket);
  // Writes staged file blocks whose backup (ticket <= done) completed out to the file. Never
  // throws for a failed write: the block stays staged and check() reports it.
  void settle(uint64_t done);
  // The block's bytes (its backup must have completed): host memory, or read from the
  // file into scratch and verified (IOError naming eviction.spill_path if it is not what
  // was written).
  const void* read(int64_t block, std::vector<uint8_t>& scratch);

  size_t block_bytes() const { return block_bytes_; }
  int64_t ram_bytes_in_use() const { return ram_used_ * int64_t(block_bytes_); }
  int64_t spill_bytes_in_use() const { return file_used_ * int64_t(block_bytes_); }

 private:
  bool in_ram(int64_t block) const { return ram_limit_ < 0 || block < ram_limit_; }
  int64_t file_index(int64_t block) const { return block - ram_limit_; }

  void grow_ram();  // one more slab of blocks (doubling, up to kSlabBytes)

  size_t block_bytes_;
  int64_t ram_limit_;                          // blocks; -1 = unbounded
  HostMemory mem_;
  // Host memory comes in slabs (few, large allocations: pinned ones are slow to make),
  // allocated on first use and kept for reuse.
  std::vector<void*> slabs_;
  std::vector<uint8_t*> block_ptr_;            // every block handed out so far
  std::vector<int64_t> ram_free_;
  int64_t ram_next_ = 0, ram_used_ = 0;
  TestFaults faults_;
  std::unique_ptr<SpillFile> file_;
  std::string write_error_;  // the first failed write since check(); "" = none
  int write_errno_ = 0;
  std::vector<int64_t> file_free_;
  int64_t file_next_ = 0, file_used_ = 0;
  struct Staged {
    int64_t block;
    uint64_t ticket;
    uint8_t* bytes;  // from mem_, like host blocks (pinned on CUDA: the backup stays asynchronous)
  };
  std::vector<Staged> staged_;  // file blocks whose bytes are not in the file yet
  std::vector<uint8_t*> staging_free_;  // staging buffers kept for reuse
  uint8_t* take_staging();  // a free staging buffer, or a new one
  uint8_t* new_staging();
};

}  // namespace chunkvale
