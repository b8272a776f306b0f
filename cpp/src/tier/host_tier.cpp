#include "host_tier.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>

#include "chunkvale/errors.h"

namespace chunkvale {

namespace {
constexpr size_t kSlabBytes = size_t(64) << 20;
constexpr int64_t kFirstSlabBlocks = 8;
}  // namespace

HostTier::HostTier(size_t block_bytes, int64_t ram_bytes, const std::string& spill_path, HostMemory memory,
                   TestFaults faults)
    : block_bytes_(block_bytes),
      ram_limit_(ram_bytes > 0 ? ram_bytes / int64_t(block_bytes) : -1),
      mem_(std::move(memory)),
      faults_(faults) {
  if (faults_.alloc.armed()) {  // test-only: host allocations that fail
    auto inner = mem_.alloc;
    mem_.alloc = [this, inner](size_t n) -> void* { return faults_.alloc.next() ? nullptr : inner(n); };
  }
  if (!spill_path.empty()) file_ = std::make_unique<SpillFile>(spill_path, block_bytes, &faults_);
}

HostTier::~HostTier() {
  for (void* p : slabs_) mem_.release(p);
  for (Staged& st : staged_) mem_.release(st.bytes);
  for (uint8_t* p : staging_free_) mem_.release(p);
  file_.reset();  // removes the file: it is scratch space of this cache only
}

void HostTier::grow_ram() {
  const int64_t have = int64_t(block_ptr_.size());
  int64_t n = std::max<int64_t>(kFirstSlabBlocks, have);  // doubling
  n = std::min<int64_t>(n, std::max<int64_t>(1, int64_t(kSlabBytes / block_bytes_)));
  if (ram_limit_ >= 0) n = std::min(n, ram_limit_ - have);
  void* p = mem_.alloc(size_t(n) * block_bytes_);
  if (!p)
    throw CapacityError(Resource::HostBlocks, have + n, have, "eviction.host_bytes: could not allocate " + std::to_string(size_t(n) * block_bytes_) +
                        " bytes of host memory for the host tier (" + std::to_string(have) +
                        " blocks in use); lower eviction.host_bytes or set eviction.spill_path");
  slabs_.push_back(p);
  for (int64_t i = 0; i < n; ++i) block_ptr_.push_back(static_cast<uint8_t*>(p) + size_t(i) * block_bytes_);
}

int64_t HostTier::alloc() {
  if (!ram_free_.empty()) {
    int64_t b = ram_free_.back();
    ram_free_.pop_back();
    ++ram_used_;
    return b;
  }
  if (ram_limit_ < 0 || ram_next_ < ram_limit_) {
    if (ram_next_ == int64_t(block_ptr_.size())) grow_ram();
    ++ram_used_;
    return ram_next_++;
  }
  if (!file_) return -1;
  ++file_used_;
  if (!file_free_.empty()) {
    int64_t b = file_free_.back();
    file_free_.pop_back();
    return b;
  }
  return ram_limit_ + file_next_++;
}

void HostTier::free(int64_t block) {
  if (in_ram(block)) {
    ram_free_.push_back(block);
    --ram_used_;
    return;
  }
  for (size_t i = 0; i < staged_.size(); ++i)
    if (staged_[i].block == block) {
      staging_free_.push_back(staged_[i].bytes);
      staged_.erase(staged_.begin() + long(i));
      break;
    }
  file_->forget(file_index(block));
  file_free_.push_back(block);
  --file_used_;
}

void HostTier::reserve(int64_t n) {
  const int64_t ram_left = ram_limit_ < 0 ? n : int64_t(ram_free_.size()) + (ram_limit_ - ram_next_);
  const int64_t from_ram = std::min(n, ram_left);
  while (int64_t(ram_free_.size()) + (int64_t(block_ptr_.size()) - ram_next_) < from_ram) grow_ram();
  if (!file_) return;
  const int64_t spilled = n - from_ram;
  // Disk space for the blocks past those in use or free (staging first: a failure of either
  // leaves the tier as it was, up to buffers kept for reuse).
  const int64_t fresh = std::max<int64_t>(0, spilled - int64_t(file_free_.size()));
  while (int64_t(staging_free_.size()) < spilled) staging_free_.push_back(new_staging());
  file_->reserve(file_next_ + fresh);
}

void HostTier::check() {
  if (write_error_.empty()) return;
  std::string msg = std::move(write_error_);
  const int err = write_errno_;
  write_error_.clear();
  write_errno_ = 0;
  if (err == ENOSPC || err == EDQUOT || err == EFBIG) throw CapacityError(Resource::HostBlocks, 1, 0, msg);  // the block it could not write
  throw IOError(msg);
}

int64_t HostTier::available() const {
  if (ram_limit_ < 0 || file_) return std::numeric_limits<int64_t>::max();
  return ram_limit_ - ram_used_;
}

void* HostTier::backup_target(int64_t block) {
  if (in_ram(block)) return block_ptr_[size_t(block)];
  // Not written out before backup_queued gives the real ticket.
  staged_.push_back({block, std::numeric_limits<uint64_t>::max(), take_staging()});
  return staged_.back().bytes;
}

uint8_t* HostTier::take_staging() {
  if (staging_free_.empty()) return new_staging();
  uint8_t* p = staging_free_.back();
  staging_free_.pop_back();
  return p;
}

uint8_t* HostTier::new_staging() {
  void* p = mem_.alloc(block_bytes_);
  if (!p)
    throw CapacityError(Resource::HostBlocks, 1, 0, "eviction.spill_path: could not allocate " + std::to_string(block_bytes_) +
                        " bytes of host memory to stage a block for the spill file");
  return static_cast<uint8_t*>(p);
}

void HostTier::backup_queued(int64_t block, uint64_t ticket) {
  for (Staged& s : staged_)
    if (s.block == block) s.ticket = ticket;
}

void HostTier::settle(uint64_t done) {
  size_t keep = 0;
  for (size_t i = 0; i < staged_.size(); ++i) {
    Staged& s = staged_[i];
    if (s.ticket > done) {
      staged_[keep++] = s;
      continue;
    }
    if (const int err = file_->write(file_index(s.block), s.bytes)) {
      // Keep this block and the rest staged: their bytes stay readable, nothing is lost;
      // the next settle() writes them again, check() reports the failure.
      if (write_error_.empty()) {
        write_errno_ = err;
        write_error_ = "eviction.spill_path: writing a " + std::to_string(block_bytes_) + "-byte block to '" +
                       file_->path() + "' failed (" + std::strerror(err) + "); " +
                       std::to_string(staged_.size() - i) +
                       " block(s) stay in host memory and are written again later, nothing was lost";
      }
      for (size_t j = i; j < staged_.size(); ++j) staged_[keep++] = staged_[j];
      break;
    }
    staging_free_.push_back(s.bytes);
  }
  staged_.resize(keep);
}

const void* HostTier::read(int64_t block, std::vector<uint8_t>& scratch) {
  if (in_ram(block)) return block_ptr_[size_t(block)];
  for (const Staged& s : staged_)
    if (s.block == block) return s.bytes;
  scratch.resize(block_bytes_);
  file_->read(file_index(block), scratch.data());
  return scratch.data();
}

}  // namespace chunkvale
