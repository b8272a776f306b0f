#include "test_faults.h"

#include <cerrno>
#include <cstdlib>
#include <string>

#include "chunkvale/errors.h"

namespace chunkvale {

int FaultPoint::next() {
  if (!err_) return 0;
  if (skip_ > 0) {
    --skip_;
    return 0;
  }
  if (count_ == 0) return 0;
  if (count_ > 0) --count_;
  return err_;
}

namespace {
int errno_named(const std::string& name) {
  if (name == "ENOSPC") return ENOSPC;
  if (name == "EIO") return EIO;
  if (name == "EDQUOT") return EDQUOT;
  if (name == "ENOMEM") return ENOMEM;
  if (name == "EFBIG") return EFBIG;
  return 0;
}
}  // namespace

TestFaults TestFaults::parse(const std::string& spec) {
  TestFaults f;
  size_t at = 0;
  while (at < spec.size()) {
    size_t end = spec.find(',', at);
    if (end == std::string::npos) end = spec.size();
    const std::string item = spec.substr(at, end - at);
    at = end + 1;
    if (item.empty()) continue;
    const size_t eq = item.find('='), amp = item.find('@');
    const auto bad = [&] {
      return ValueError("test_hooks.faults: expected OP=ERRNO@SKIP[xCOUNT] items (OP: write, read, "
                        "fallocate, alloc; ERRNO: ENOSPC, EIO, EDQUOT, ENOMEM, EFBIG), got '" + item + "'");
    };
    if (eq == std::string::npos || amp == std::string::npos || amp < eq) throw bad();
    const std::string op = item.substr(0, eq), err = item.substr(eq + 1, amp - eq - 1);
    const std::string rest = item.substr(amp + 1);
    const size_t x = rest.find('x');
    char* e1 = nullptr;
    const long long skip = std::strtoll(rest.c_str(), &e1, 10);
    long long count = -1;
    if (x != std::string::npos) {
      char* e2 = nullptr;
      count = std::strtoll(rest.c_str() + x + 1, &e2, 10);
      if (e2 == rest.c_str() + x + 1 || *e2 || count < 1) throw bad();
    }
    if (e1 == rest.c_str() || (x == std::string::npos ? *e1 != 0 : e1 != rest.c_str() + x) || skip < 0 ||
        !errno_named(err))
      throw bad();
    FaultPoint p(errno_named(err), skip, count);
    if (op == "write") f.write = p;
    else if (op == "read") f.read = p;
    else if (op == "fallocate") f.fallocate = p;
    else if (op == "alloc") f.alloc = p;
    else throw bad();
  }
  return f;
}

}  // namespace chunkvale
