// ChooseThreadPlan: the config wins, OPENBLAS_NUM_THREADS wins over shoal's own choice, ranks
// on one host split the cores. The expected counts are computed from AvailableCores() here.
// PeakGflops: one cached peak per GEMM type.
#include "runtime/device_probe.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <stdlib.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
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

// The MFU denominators of an fp32 and a bf16 run are cached apart: the bf16 entry's key is
// fp32's with "|bf16", and each type reads its own entry back (an edited value shows through).
TEST(PeakGflopsTest, EachGemmTypeHasItsOwnCachedPeak) {
  char tmpl[] = "/tmp/shoal_peak_XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  const char* old = ::getenv("SHOAL_CACHE_DIR");
  const std::string old_value = old != nullptr ? old : "";
  ::setenv("SHOAL_CACHE_DIR", dir.c_str(), 1);
  const absl::StatusOr<double> fp32 = PeakGflops(false, GemmType::kFloat32);
  const absl::StatusOr<double> bf16 = PeakGflops(false, GemmType::kBFloat16);
  ASSERT_TRUE(fp32.ok() && bf16.ok());
  EXPECT_GT(*fp32, 0);
  EXPECT_GT(*bf16, 0);
  auto read = [&] {
    std::ifstream in(dir + "/peak_gflops.json");
    std::stringstream text;
    text << in.rdbuf();
    return nlohmann::json::parse(text.str());
  };
  nlohmann::json cache = read();
  ASSERT_EQ(cache.size(), 2u) << cache.dump();
  std::string fp32_key, bf16_key;
  for (const auto& [key, value] : cache.items()) {
    (key.size() > 5 && key.substr(key.size() - 5) == "|bf16" ? bf16_key : fp32_key) = key;
  }
  ASSERT_FALSE(bf16_key.empty()) << cache.dump();
  EXPECT_EQ(bf16_key, fp32_key + "|bf16");
  EXPECT_DOUBLE_EQ(cache[bf16_key].get<double>(), *bf16);
  cache[bf16_key] = 12345.0;
  std::ofstream(dir + "/peak_gflops.json") << cache.dump();
  EXPECT_DOUBLE_EQ(*PeakGflops(false, GemmType::kBFloat16), 12345.0);
  EXPECT_DOUBLE_EQ(*PeakGflops(false, GemmType::kFloat32), *fp32);
  if (old != nullptr) {
    ::setenv("SHOAL_CACHE_DIR", old_value.c_str(), 1);
  } else {
    ::unsetenv("SHOAL_CACHE_DIR");
  }
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace shoal::runtime
