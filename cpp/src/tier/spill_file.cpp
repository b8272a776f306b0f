#include "spill_file.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>

#include "chunkvale/errors.h"

namespace chunkvale {

uint64_t hash_bytes(const void* p, size_t n, uint64_t seed) {
  constexpr uint64_t k1 = 0x9E3779B185EBCA87ull, k2 = 0xC2B2AE3D27D4EB4Full;
  const auto* b = static_cast<const uint8_t*>(p);
  uint64_t h = seed ^ (uint64_t(n) * k1);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, b + i, 8);
    h ^= w * k2;
    h = ((h << 31) | (h >> 33)) * k1;
  }
  uint64_t w = 0;
  if (i < n) std::memcpy(&w, b + i, n - i);
  h ^= w * k2;
  h ^= h >> 33;
  h *= 0xFF51AFD7ED558CCDull;
  h ^= h >> 33;
  h *= 0xC4CEB9FE1A85EC53ull;
  return h ^ (h >> 33);
}

namespace {
std::string quoted(const std::string& path) { return "'" + path + "'"; }

uint64_t new_owner() {
  static std::atomic<uint64_t> counter{0};
  const uint64_t t = uint64_t(std::chrono::steady_clock::now().time_since_epoch().count());
  return hash_bytes(&t, sizeof t, uint64_t(::getpid()) * 0x100000001B3ull + counter++);
}
}  // namespace

SpillFile::SpillFile(const std::string& path, size_t block_bytes, TestFaults* faults)
    : path_(path), block_bytes_(block_bytes), faults_(faults), owner_(new_owner()) {
  const std::string arg = "eviction.spill_path: expected ";
  // Open without truncating: the file may be another cache's until we hold its lock. The
  // path may be removed (its owner closed) between open and lock: then open it again.
  for (int attempt = 0;; ++attempt) {
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd_ < 0)
      throw ValueError(arg + "a file chunkvale can create and write, got " + quoted(path) + " (" +
                       std::strerror(errno) + ")");
    struct stat st {};
    if (::fstat(fd_, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd_);
      fd_ = -1;
      throw ValueError(arg + "a regular file, got " + quoted(path) + " (a device, pipe or other special file)");
    }
    if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      const int err = errno;
      ::close(fd_);
      fd_ = -1;
      if (err == EWOULDBLOCK)
        throw ValueError(arg + "a file no other cache uses, got " + quoted(path) +
                         ", which another cache (in this process or another) holds as its spill file");
      throw ValueError(arg + "a file chunkvale can lock, got " + quoted(path) + " (" + std::strerror(err) + ")");
    }
    struct stat now {};
    if (::stat(path.c_str(), &now) == 0 && now.st_dev == st.st_dev && now.st_ino == st.st_ino) break;
    ::close(fd_);  // we locked a file its owner had just removed
    fd_ = -1;
    if (attempt == 8)
      throw ValueError(arg + "a path that stays put, got " + quoted(path) + " (replaced while opening it)");
  }
  if (::ftruncate(fd_, 0) != 0) {
    const int err = errno;
    ::close(fd_);
    fd_ = -1;
    throw ValueError(arg + "a file chunkvale can truncate, got " + quoted(path) + " (" + std::strerror(err) + ")");
  }
}

SpillFile::~SpillFile() {
  if (fd_ < 0) return;
  ::unlink(path_.c_str());  // while we still hold the lock: nobody else can be using it
  ::close(fd_);             // releases the lock
}

void SpillFile::reserve(int64_t blocks) {
  if (blocks <= reserved_) return;
  int err = faults_ ? faults_->fallocate.next() : 0;
  if (!err) err = ::posix_fallocate(fd_, 0, off_t(blocks) * off_t(block_bytes_));
  if (err == EINVAL || err == EOPNOTSUPP) err = 0;  // the file system cannot reserve; writes will tell
  if (err == ENOSPC || err == EDQUOT || err == EFBIG)
    throw CapacityError(Resource::HostBlocks, blocks, reserved_, "eviction.spill_path: the spill file " + quoted(path_) + " needs " +
                        std::to_string(blocks * int64_t(block_bytes_)) + " bytes for this step's backups, "
                        "but its device has no room (" + std::strerror(err) +
                        "). Free disk space, raise eviction.host_bytes, or plan fewer tokens.");
  if (err)
    throw IOError("eviction.spill_path: reserving " + std::to_string(blocks * int64_t(block_bytes_)) +
                  " bytes in " + quoted(path_) + " failed (" + std::strerror(err) + ")");
  reserved_ = blocks;
}

uint64_t SpillFile::block_hash(int64_t index, uint64_t generation, const void* bytes) const {
  return hash_bytes(bytes, block_bytes_, owner_ ^ (uint64_t(index) * 0x9E3779B97F4A7C15ull) ^ (generation << 1));
}

int SpillFile::write(int64_t index, const void* bytes) {
  if (size_t(index) >= tags_.size()) tags_.resize(size_t(index) + 1);
  int err = faults_ ? faults_->write.next() : 0;
  if (!err) {
    const ssize_t n = ::pwrite(fd_, bytes, block_bytes_, off_t(index) * off_t(block_bytes_));
    if (n != ssize_t(block_bytes_)) err = n < 0 ? errno : ENOSPC;  // a short write: out of room
  }
  if (err) return err;
  const uint64_t g = next_generation_++;
  tags_[size_t(index)] = {g, block_hash(index, g, bytes)};
  return 0;
}

void SpillFile::read(int64_t index, void* dst) {
  const Tag t = size_t(index) < tags_.size() ? tags_[size_t(index)] : Tag{};
  if (t.generation == 0)
    throw IOError("eviction.spill_path: block " + std::to_string(index) + " of " + quoted(path_) +
                  " was never written (internal error: a read of a block without a copy)");
  int err = faults_ ? faults_->read.next() : 0;
  if (!err) {
    const ssize_t n = ::pread(fd_, dst, block_bytes_, off_t(index) * off_t(block_bytes_));
    if (n != ssize_t(block_bytes_)) err = n < 0 ? errno : EIO;  // short: the file was truncated
  }
  if (err)
    throw IOError("eviction.spill_path: reading block " + std::to_string(index) + " from " + quoted(path_) +
                  " failed (" + std::strerror(err) + ")");
  if (block_hash(index, t.generation, dst) != t.hash)
    throw IOError("eviction.spill_path: block " + std::to_string(index) + " of " + quoted(path_) +
                  " does not hold what this cache wrote (checksum mismatch: the file was changed "
                  "behind the cache's back, or the disk returned bad data); its K/V are lost");
}

void SpillFile::forget(int64_t index) {
  if (size_t(index) < tags_.size()) tags_[size_t(index)] = Tag{};
}

}  // namespace chunkvale
