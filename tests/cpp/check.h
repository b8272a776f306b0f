// Minimal test helpers (no test framework needed): CHECK records failures, main returns
// their count so ctest reports the test as failed.
#pragma once
#include <cstdio>
#include <string>

inline int& failures() {
  static int n = 0;
  return n;
}

#define CHECK(cond)                                                          \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures();                                                          \
    }                                                                        \
  } while (0)

// CHECK with a printf-style message (the values that differed).
#define EXPECT(cond, ...)                                             \
  do {                                                                \
    if (!(cond)) {                                                    \
      std::fprintf(stderr, "%s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                              \
      std::fprintf(stderr, "\n");                                     \
      ++failures();                                                   \
    }                                                                 \
  } while (0)

#define CHECK_THROWS(stmt, Ex, needle)                                       \
  do {                                                                       \
    bool caught_ = false;                                                    \
    try {                                                                    \
      stmt;                                                                  \
    } catch (const Ex& e_) {                                                 \
      caught_ = std::string(e_.what()).find(needle) != std::string::npos;    \
      if (!caught_) std::fprintf(stderr, "message without '%s': %s\n", needle, e_.what()); \
    }                                                                        \
    if (!caught_) {                                                          \
      std::fprintf(stderr, "%s:%d: expected %s from %s\n", __FILE__, __LINE__, #Ex, #stmt); \
      ++failures();                                                          \
    }                                                                        \
  } while (0)

inline int finish(const char* name) {
  if (failures()) std::fprintf(stderr, "%s: %d check(s) failed\n", name, failures());
  else std::printf("%s: all checks passed\n", name);
  return failures() ? 1 : 0;
}
