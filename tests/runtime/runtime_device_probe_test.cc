// ChooseThreadPlan: the config wins, OPENBLAS_NUM_THREADS wins over shoal's own choice, ranks
// on one host split the cores. The expected counts are computed from AvailableCores() here.
#include "runtime/device_probe.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <string>

namespace shoal::runtime {
namespace {

// Sets (or unsets, for null) OPENBLAS_NUM_THREADS for one test and puts it back after.
class BlasEnv {
 public:
  explicit BlasEnv(const char* value) {
    if (const char* old = ::getenv("OPENBLAS_NUM_THREADS")) {
      old_ = old;
      had_ = true;
    }
    if (value == nullptr) {
      ::unsetenv("OPENBLAS_NUM_THREADS");
    } else {
      ::setenv("OPENBLAS_NUM_THREADS", value, 1);
    }
  }
  ~BlasEnv() {
    if (had_) {
      ::setenv("OPENBLAS_NUM_THREADS", old_.c_str(), 1);
    } else {
      ::unsetenv("OPENBLAS_NUM_THREADS");
    }
  }

 private:
  std::string old_;
  bool had_ = false;
};

TEST(ThreadPlan, WithoutTheVariableBlasGetsEveryCoreOrItsShare) {
  BlasEnv env(nullptr);
  const int cores = AvailableCores();
  ASSERT_GE(cores, 1);
  ThreadPlan p = ChooseThreadPlan({}, 0, 0);
  EXPECT_EQ(p.omp_threads, 1);
  EXPECT_EQ(p.blas_threads, cores);
  p = ChooseThreadPlan({}, 0, 0, 2 * cores);  // more ranks than cores: one each
  EXPECT_EQ(p.blas_threads, 1);
  p = ChooseThreadPlan({}, 3, 5);
  EXPECT_EQ(p.omp_threads, 3);
  EXPECT_EQ(p.blas_threads, 5);
  EXPECT_EQ(p.reason, "from the config");
}

TEST(ThreadPlan, OpenBlasNumThreadsWinsOverShoalsChoiceNotOverTheConfig) {
  {
    BlasEnv env("1");
    ThreadPlan p = ChooseThreadPlan({}, 0, 0);
    EXPECT_EQ(p.blas_threads, 1);
    EXPECT_NE(p.reason.find("OPENBLAS_NUM_THREADS"), std::string::npos) << p.reason;
    p = ChooseThreadPlan({}, 0, 0, 4);
    EXPECT_EQ(p.blas_threads, 1);
    p = ChooseThreadPlan({}, 0, 3);  // the config's key wins
    EXPECT_EQ(p.blas_threads, 3);
    EXPECT_EQ(p.reason, "from the config");
  }
  {
    BlasEnv env("7");
    EXPECT_EQ(ChooseThreadPlan({}, 2, 0).blas_threads, 7);
    EXPECT_EQ(ChooseThreadPlan({}, 2, 0).omp_threads, 2);
  }
}

TEST(ThreadPlan, ABadOpenBlasNumThreadsIsIgnoredAndSaidSo) {
  const int cores = AvailableCores();
  for (const char* bad : {"0", "-2", "two", "3x", "99999"}) {
    BlasEnv env(bad);
    const ThreadPlan p = ChooseThreadPlan({}, 0, 0);
    EXPECT_EQ(p.blas_threads, cores) << bad;
    EXPECT_NE(p.reason.find("ignored"), std::string::npos) << bad << ": " << p.reason;
    EXPECT_NE(p.reason.find(bad), std::string::npos) << p.reason;
  }
}

}  // namespace
}  // namespace shoal::runtime
