// The host tier's pieces on their own: the block store (memory, then spill file; staged
// file blocks written out once their backup completed) and the per-layer residency table
// (slot reuse, LRU victims that have a host copy and are not protected).
#include <fcntl.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <unistd.h>
#include <vector>

#include "check.h"
#include "chunkvale/errors.h"
#include "host_tier.h"
#include "residency.h"
#include "spill_file.h"
#include "test_faults.h"

using namespace chunkvale;

static void fill(void* p, size_t n, int seed) {
  auto* b = static_cast<uint8_t*>(p);
  for (size_t i = 0; i < n; ++i) b[i] = uint8_t(seed * 31 + i * 7);
}

static bool holds(const void* p, size_t n, int seed) {
  std::vector<uint8_t> want(n);
  fill(want.data(), n, seed);
  return std::memcmp(p, want.data(), n) == 0;
}

static void host_tier_spills_past_its_memory() {
  const size_t B = 256;
  std::string path = "/tmp/chunkvale_test_spill_" + std::to_string(::getpid());
  std::vector<uint8_t> scratch;
  {
    HostTier h(B, 2 * B, path);
    CHECK(h.available() > 1000);  // a spill file makes it unbounded
    std::vector<int64_t> blocks;
    for (int i = 0; i < 5; ++i) {
      int64_t b = h.alloc();
      CHECK(b >= 0);
      fill(h.backup_target(b), B, i);  // what a backend's copy would do
      h.backup_queued(b, uint64_t(i + 1));
      blocks.push_back(b);
    }
    CHECK(h.ram_bytes_in_use() == int64_t(2 * B) && h.spill_bytes_in_use() == int64_t(3 * B));
    h.settle(3);  // backups 1..3 done: the file block among them is written out
    for (int i = 0; i < 5; ++i) CHECK(holds(h.read(blocks[size_t(i)], scratch), B, i));
    h.settle(5);
    for (int i = 0; i < 5; ++i) CHECK(holds(h.read(blocks[size_t(i)], scratch), B, i));
    h.free(blocks[3]);
    CHECK(h.spill_bytes_in_use() == int64_t(2 * B));
    int64_t again = h.alloc();
    CHECK(again == blocks[3]);  // the freed file block is reused
    CHECK(access(path.c_str(), F_OK) == 0);
  }
  CHECK(access(path.c_str(), F_OK) != 0);  // removed with the tier

  HostTier bounded(B, 2 * B, "");
  CHECK(bounded.available() == 2);
  CHECK(bounded.alloc() >= 0 && bounded.alloc() >= 0);
  CHECK(bounded.alloc() == -1);  // full, no file: the caller decides
  CHECK_THROWS(HostTier(B, 2 * B, "/nonexistent-dir/x"), ValueError, "eviction.spill_path");
}

static void residency_reuses_slots_and_picks_lru_victims() {
  Residency r(1, 3, /*chunks=*/10, /*slots=*/2);  // layers 1 and 2 evict
  CHECK(r.first_layer() == 1);
  int32_t s0 = r.take_free(1), s1 = r.take_free(1);
  CHECK(s0 >= 0 && s1 >= 0 && s0 != s1 && r.take_free(1) == -1);
  r.place(1, 4, s0);
  r.place(1, 7, s1);
  r.touch(1, 4, 1);
  r.touch(1, 7, 2);
  CHECK(r.slot(1, 4) == s0 && r.slot(2, 4) == -1);  // residency is per layer
  CHECK(r.victim(1, 3) == -1);                        // no host copies yet: nothing evictable
  r.set_host(1, 4, 100, 5);
  r.set_host(1, 7, 101, 6);
  CHECK(r.victim(1, 3) == 4);  // least recently used
  r.touch(1, 4, 3);
  CHECK(r.victim(1, 3) == 7);  // 4 is protected by the current operation
  r.touch(1, 7, 3);
  CHECK(r.victim(1, 3) == -1);
  r.evict(1, 4);
  CHECK(r.slot(1, 4) == -1 && r.host_block(1, 4) == 100 && r.ticket(1, 4) == 5);
  CHECK(r.take_free(1) == s0);
  CHECK_THROWS(r.place(1, 7, s0), std::logic_error, "double placement");
  CHECK(r.slots_in_use() == 2);
}

// reserve() allocates everything the next n blocks need, so running out of host memory is
// reported before a step changes anything (the cache calls it while planning), and the
// blocks handed out afterwards allocate nothing.
static void host_tier_reserves_before_handing_out() {
  const size_t B = 256;
  int calls = 0;
  bool fail = false;
  HostMemory counted = plain_host_memory();
  HostMemory mem{[&](size_t n) -> void* {
                   ++calls;
                   return fail ? nullptr : counted.alloc(n);
                 },
                 counted.release};
  {
    HostTier h(B, 4 * B, "", mem);
    fail = true;
    CHECK_THROWS(h.reserve(1), CapacityError, "eviction.host_bytes");
    CHECK(h.available() == 4 && h.ram_bytes_in_use() == 0);
    fail = false;
    h.reserve(4);
    const int after = calls;
    for (int i = 0; i < 4; ++i) CHECK(h.backup_target(h.alloc()) != nullptr);
    CHECK(calls == after);
    CHECK(h.alloc() == -1);
  }
  std::string path = "/tmp/chunkvale_test_reserve_" + std::to_string(::getpid());
  {
    HostTier h(B, 2 * B, path, mem);
    fail = true;
    CHECK_THROWS(h.reserve(1), CapacityError, "eviction.host_bytes");
    fail = false;
    h.reserve(2);
    fail = true;  // the RAM part is there; the spill staging cannot be had
    CHECK_THROWS(h.reserve(5), CapacityError, "eviction.spill_path");
    fail = false;
    h.reserve(5);
    const int after = calls;
    for (int i = 0; i < 5; ++i) CHECK(h.backup_target(h.alloc()) != nullptr);
    CHECK(calls == after);
    CHECK(h.spill_bytes_in_use() == 3 * int64_t(B));
  }
}


static std::string temp_path(const char* what) {
  return "/tmp/chunkvale_test_" + std::string(what) + "_" + std::to_string(::getpid());
}

// One cache owns its spill file: a second one on the same path (here: the same process; the
// Python tests do it from another process) is refused before it truncates anything, and the
// path is free again once the owner is gone.
static void spill_file_is_owned_by_one_cache() {
  const size_t B = 64;
  const std::string path = temp_path("own");
  std::vector<uint8_t> out(B);
  {
    SpillFile a(path, B);
    std::vector<uint8_t> blk(B);
    fill(blk.data(), B, 3);
    CHECK(a.write(0, blk.data()) == 0);
    CHECK_THROWS(SpillFile(path, B), ValueError, "another cache");
    CHECK_THROWS(HostTier(B, B, path), ValueError, "eviction.spill_path");
    a.read(0, out.data());  // the refused opener changed nothing
    CHECK(holds(out.data(), B, 3));
  }
  CHECK(access(path.c_str(), F_OK) != 0);
  { SpillFile again(path, B); }  // free once the owner went
  CHECK_THROWS(SpillFile("/dev/null", B), ValueError, "regular file");
}

// Every block read back is checked against what was written: bytes changed behind the
// file's back, or another block's bytes, are an IOError, never data.
static void spill_file_refuses_blocks_it_did_not_write() {
  const size_t B = 256;
  const std::string path = temp_path("sum");
  SpillFile f(path, B);
  std::vector<uint8_t> a(B), b(B), out(B);
  fill(a.data(), B, 1);
  fill(b.data(), B, 2);
  CHECK(f.write(0, a.data()) == 0 && f.write(1, b.data()) == 0);
  f.read(1, out.data());
  CHECK(holds(out.data(), B, 2));
  int fd = ::open(path.c_str(), O_RDWR);
  CHECK(fd >= 0);
  CHECK(::pwrite(fd, a.data(), B, off_t(B)) == ssize_t(B));  // block 0's bytes into block 1
  CHECK_THROWS(f.read(1, out.data()), IOError, "checksum mismatch");
  uint8_t flip = uint8_t(a[7] ^ 1);
  CHECK(::pwrite(fd, &flip, 1, 7) == 1);  // one bit of block 0
  CHECK_THROWS(f.read(0, out.data()), IOError, "eviction.spill_path");
  CHECK(f.write(0, a.data()) == 0);  // written again: readable again
  f.read(0, out.data());
  CHECK(holds(out.data(), B, 1));
  CHECK(::ftruncate(fd, 0) == 0);  // a short file is an error too
  CHECK_THROWS(f.read(0, out.data()), IOError, "reading block 0");
  ::close(fd);
  f.forget(0);
  CHECK_THROWS(f.read(0, out.data()), IOError, "never written");
}

// Injected faults: a failed write keeps the block staged (readable, written again later) and
// is reported by check(); a disk that cannot reserve space is a CapacityError from reserve().
static void host_tier_write_faults_surface_and_lose_nothing() {
  const size_t B = 128;
  const std::string path = temp_path("fault");
  std::vector<uint8_t> scratch;
  {
    HostTier h(B, B, path, plain_host_memory(), TestFaults::parse("write=EIO@0x2"));
    h.reserve(4);
    std::vector<int64_t> blocks;
    for (int i = 0; i < 3; ++i) {
      int64_t b = h.alloc();
      fill(h.backup_target(b), B, 10 + i);
      h.backup_queued(b, uint64_t(i + 1));
      blocks.push_back(b);
    }
    h.settle(3);  // the first file block fails (EIO): it and the next stay staged
    CHECK_THROWS(h.check(), IOError, "Input/output error");
    h.check();    // reported once
    for (int i = 0; i < 3; ++i) CHECK(holds(h.read(blocks[size_t(i)], scratch), B, 10 + i));
    h.settle(3);  // the second failure
    CHECK_THROWS(h.check(), IOError, "nothing was lost");
    h.settle(3);  // the fault is over: written out now
    h.check();
    for (int i = 0; i < 3; ++i) CHECK(holds(h.read(blocks[size_t(i)], scratch), B, 10 + i));
  }
  {
    HostTier h(B, B, path, plain_host_memory(), TestFaults::parse("write=ENOSPC@0x1"));
    h.reserve(2);
    int64_t r = h.alloc(), f = h.alloc();
    fill(h.backup_target(r), B, 1);
    fill(h.backup_target(f), B, 2);
    h.backup_queued(r, 1);
    h.backup_queued(f, 2);
    h.settle(2);
    CHECK_THROWS(h.check(), CapacityError, "eviction.spill_path");  // a full disk: running out
    CHECK(holds(h.read(f, scratch), B, 2));
  }
  {
    HostTier h(B, B, path, plain_host_memory(), TestFaults::parse("fallocate=ENOSPC@0x1"));
    CHECK_THROWS(h.reserve(3), CapacityError, "no room");
    CHECK(h.spill_bytes_in_use() == 0 && h.ram_bytes_in_use() == 0);
    h.reserve(3);  // the fault passed
  }
  {
    HostTier h(B, 4 * B, "", plain_host_memory(), TestFaults::parse("alloc=ENOMEM@0"));
    CHECK_THROWS(h.reserve(1), CapacityError, "eviction.host_bytes");
    CHECK(h.available() == 4);
  }
  CHECK_THROWS(TestFaults::parse("write=EIO"), ValueError, "test_hooks.faults");
  CHECK_THROWS(TestFaults::parse("scribble=EIO@1"), ValueError, "OP=ERRNO@SKIP");
  CHECK_THROWS(TestFaults::parse("read=EWHAT@1"), ValueError, "ERRNO");
  FaultPoint p = TestFaults::parse("read=EIO@2x1").read;
  CHECK(p.next() == 0 && p.next() == 0 && p.next() == EIO && p.next() == 0);
}

int main() {
  host_tier_spills_past_its_memory();
  spill_file_is_owned_by_one_cache();
  spill_file_refuses_blocks_it_did_not_write();
  host_tier_write_faults_surface_and_lose_nothing();
  residency_reuses_slots_and_picks_lru_victims();
  host_tier_reserves_before_handing_out();
  return finish("host_tier");
}
