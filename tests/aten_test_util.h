// Test helpers that need ATen (kept apart from test_util.h, which does not).
#ifndef SHOAL_TESTS_ATEN_TEST_UTIL_H_
#define SHOAL_TESTS_ATEN_TEST_UTIL_H_

#include <ATen/Parallel.h>

namespace shoal::testing {

// Restores LibTorch's thread count at scope exit.
class ThreadCountGuard {
 public:
  ThreadCountGuard() : saved_(at::get_num_threads()) {}
  ~ThreadCountGuard() { at::set_num_threads(saved_); }
  ThreadCountGuard(const ThreadCountGuard&) = delete;
  ThreadCountGuard& operator=(const ThreadCountGuard&) = delete;

 private:
  int saved_;
};

}  // namespace shoal::testing

#endif  // SHOAL_TESTS_ATEN_TEST_UTIL_H_
