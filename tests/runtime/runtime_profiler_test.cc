// The device profile (runtime/profiler.h): every field against an independent reading of the
// same source (/proc, statvfs, sched_getaffinity, gethostname), the per-machine cache (a planted
// value comes back; a corrupt file is rewritten), option checks, the throttle's sleep, and the
// trainer's per-step report and throttle option.
#include <gtest/gtest.h>
#include <sched.h>
#include <stdlib.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "common/file_util.h"
#include "runtime/config.h"
#include "runtime/device_probe.h"
#include "runtime/prepare_data.h"
#include "runtime/profiler.h"
#include "runtime/trainer.h"
#include "tests/test_util.h"

namespace shoal::runtime {
namespace {

using shoal::testing::ReadTextFile;
using shoal::testing::TempDir;
using shoal::testing::WriteTextFile;

// "key: value" from a /proc file, the value's first word.
std::string ProcField(const std::string& path, const std::string& key) {
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key, 0) == 0) {
      std::string v = line.substr(line.find(':') + 1);
      v.erase(0, v.find_first_not_of(" \t"));
      return v;
    }
  }
  return "";
}

class ProfilerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ::setenv("SHOAL_CACHE_DIR", cache_.path().c_str(), 1);
    options_.seconds = 0.2;  // enough for a rate; the test is about the fields
    options_.disk_path = disk_.path();
  }
  std::string CachePath() const { return cache_ / "profile.json"; }

  TempDir cache_, disk_;
  ProfileOptions options_;
};

TEST_F(ProfilerTest, FieldsMatchTheMachine) {
  auto p = ProfileDevice(options_);
  ASSERT_TRUE(p.ok()) << p.status();

  char host[256] = {0};
  ::gethostname(host, sizeof(host) - 1);
  EXPECT_EQ(p->host(), host);
  EXPECT_EQ(p->kind(), v1::DEVICE_KIND_CPU);
  cpu_set_t set;
  ASSERT_EQ(::sched_getaffinity(0, sizeof(set), &set), 0);
  EXPECT_EQ(p->cores(), CPU_COUNT(&set));
  const std::string model = ProcField("/proc/cpuinfo", "model name");
  EXPECT_NE(p->device_name().find(model), std::string::npos) << p->device_name();
  EXPECT_NE(p->device_name().find("(" + std::to_string(CPU_COUNT(&set)) + " core"),
            std::string::npos)
      << p->device_name();
  EXPECT_EQ(p->shoal_version(), "0.1.0");
  EXPECT_EQ(p->throttle(), 1.0);

  EXPECT_GT(p->fp32_gflops(), 0);
  EXPECT_TRUE(std::isfinite(p->fp32_gflops()));
  EXPECT_GE(p->bf16_gflops(), 0);  // 0 where this build has no bf16 matmul
  EXPECT_GT(p->host_copy_gbps(), 0);
  // A CPU build: nothing on a GPU, no network measured here (the worker link does that).
  EXPECT_EQ(p->memory().gpu_bytes(), 0);
  EXPECT_EQ(p->h2d_gbps(), 0);
  EXPECT_EQ(p->net_gbps(), 0);
  EXPECT_EQ(p->rtt_ms(), 0);

  // Host RAM: what is available now, so positive and at most the machine's total.
  const int64_t total = std::stoll(ProcField("/proc/meminfo", "MemTotal")) * 1024;
  EXPECT_GT(p->memory().host_bytes(), 0);
  EXPECT_LE(p->memory().host_bytes(), total);
  // Disk: free bytes of the file system holding disk_path, as statvfs reads them (other
  // processes write meanwhile: within 1 GiB).
  struct statvfs st;
  ASSERT_EQ(::statvfs(disk_.path().c_str(), &st), 0);
  const double free_bytes = static_cast<double>(st.f_bavail) * st.f_frsize;
  EXPECT_NEAR(static_cast<double>(p->memory().disk_bytes()), free_bytes, double(1 << 30));
}

TEST_F(ProfilerTest, CachedPerMachineAndDividedByTheThrottle) {
  auto first = ProfileDevice(options_);
  ASSERT_TRUE(first.ok()) << first.status();
  // The cache holds one entry, keyed by host, CPU model and cores.
  auto cache = nlohmann::json::parse(ReadTextFile(CachePath()));
  ASSERT_TRUE(cache.is_object());
  ASSERT_EQ(cache.size(), 1u);
  const std::string key = cache.begin().key();
  EXPECT_NE(key.find(first->host()), std::string::npos) << key;
  EXPECT_NE(key.find(ProcField("/proc/cpuinfo", "model name")), std::string::npos) << key;
  EXPECT_NE(key.find(std::to_string(first->cores()) + " cores"), std::string::npos) << key;
  EXPECT_EQ(key.find("throttle"), std::string::npos) << key;
  // Memory is never cached (it changes from run to run).
  EXPECT_FALSE(cache[key].contains("memory")) << cache.dump();

  // A planted value comes back: the second call read the cache instead of measuring.
  cache[key]["fp32_gflops"] = 12345.5;
  WriteTextFile(CachePath(), cache.dump());
  auto second = ProfileDevice(options_);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(second->fp32_gflops(), 12345.5);
  EXPECT_GT(second->memory().host_bytes(), 0);  // measured now, not from the cache

  // --refresh measures again and overwrites the entry.
  ProfileOptions refresh = options_;
  refresh.refresh = true;
  auto third = ProfileDevice(refresh);
  ASSERT_TRUE(third.ok()) << third.status();
  EXPECT_NE(third->fp32_gflops(), 12345.5);
  EXPECT_NE(nlohmann::json::parse(ReadTextFile(CachePath()))[key]["fp32_gflops"], 12345.5);

  // A throttle divides the cached (unthrottled) rates: no second entry, no second measurement,
  // and exactly the factor between the two devices whatever the load when it was measured.
  const auto cached = nlohmann::json::parse(ReadTextFile(CachePath()))[key];
  ProfileOptions slow = options_;
  slow.throttle = 3;
  auto throttled = ProfileDevice(slow);
  ASSERT_TRUE(throttled.ok()) << throttled.status();
  EXPECT_EQ(throttled->throttle(), 3.0);
  EXPECT_DOUBLE_EQ(throttled->fp32_gflops(), cached.value("fp32_gflops", 0.0) / 3);
  EXPECT_DOUBLE_EQ(throttled->bf16_gflops(), cached.value("bf16_gflops", 0.0) / 3);
  EXPECT_DOUBLE_EQ(throttled->host_copy_gbps(), cached.value("host_copy_gbps", 0.0) / 3);
  cache = nlohmann::json::parse(ReadTextFile(CachePath()));
  EXPECT_EQ(cache.size(), 1u) << cache.dump();
  EXPECT_EQ(cache[key]["fp32_gflops"], cached["fp32_gflops"]) << cache.dump();
}

TEST_F(ProfilerTest, CorruptCacheIsIgnoredAndRewritten) {
  WriteTextFile(CachePath(), "{ this is not json");
  auto p = ProfileDevice(options_);
  ASSERT_TRUE(p.ok()) << p.status();
  auto cache = nlohmann::json::parse(ReadTextFile(CachePath()), nullptr, false);
  ASSERT_TRUE(cache.is_object()) << ReadTextFile(CachePath());
  EXPECT_EQ(cache.size(), 1u);

  // A corrupt entry (wrong types) inside a valid file: measured again, the entry replaced.
  const std::string key = cache.begin().key();
  cache[key] = {{"fp32_gflops", "fast"}, {"cores", -1}};
  WriteTextFile(CachePath(), cache.dump());
  auto again = ProfileDevice(options_);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_GT(again->fp32_gflops(), 0);
  cache = nlohmann::json::parse(ReadTextFile(CachePath()));
  EXPECT_TRUE(cache[key]["fp32_gflops"].is_number());

  // An entry that is not the machine's own rates (a throttle in it): measured again, replaced.
  cache[key]["throttle"] = 3;
  cache[key]["fp32_gflops"] = 12345.5;
  WriteTextFile(CachePath(), cache.dump());
  auto third = ProfileDevice(options_);
  ASSERT_TRUE(third.ok()) << third.status();
  EXPECT_NE(third->fp32_gflops(), 12345.5);
  cache = nlohmann::json::parse(ReadTextFile(CachePath()));
  EXPECT_EQ(cache[key].value("throttle", 0.0), 1.0) << cache.dump();
}

TEST_F(ProfilerTest, BadOptionsAreNamed) {
  for (double t : {0.5, 0.0, -2.0, std::numeric_limits<double>::quiet_NaN(),
                   std::numeric_limits<double>::infinity()}) {
    ProfileOptions o = options_;
    o.throttle = t;
    auto p = ProfileDevice(o);
    ASSERT_FALSE(p.ok()) << t;
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(p.status().message().find("throttle"), std::string::npos) << p.status();
  }
  ProfileOptions o = options_;
  o.disk_path = disk_ / "missing";
  auto p = ProfileDevice(o);
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(p.status().message().find(disk_ / "missing"), std::string::npos) << p.status();
  o = options_;
  o.seconds = 0;
  EXPECT_EQ(ProfileDevice(o).status().code(), absl::StatusCode::kInvalidArgument);
  // Nothing was measured or cached for the bad calls.
  EXPECT_FALSE(PathExists(CachePath()));
}

TEST(ThrottleTest, SleepsFactorMinusOneTimesTheWork) {
  EXPECT_TRUE(Throttle::CheckFactor(1.0, "x").ok());
  EXPECT_TRUE(Throttle::CheckFactor(2.5, "x").ok());
  EXPECT_EQ(Throttle::CheckFactor(0.99, "--throttle").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Throttle(1.0).After(0.5), 0.0);
  const Throttle t(3.0);
  EXPECT_DOUBLE_EQ(t.After(0.0), 0.0);
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_DOUBLE_EQ(t.After(0.02), 0.04);  // (3 - 1) x 20 ms
  // A sleep lasts at least as long as asked (a lower bound only: no timing assertion).
  EXPECT_GE(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 0.04);
}

TEST(ThrottleTest, WorkClockCountsNoMoreThanTheCpuTimeSpent) {
  // Waiting (here a sleep, as a rank waits for a core another rank holds) spends no CPU time:
  // next to none of it counts, so a throttle multiplies none of it.
  const WorkClock idle = WorkClock::Start();
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_LT(idle.Seconds(), 0.1);
  // Work on the CPU counts in full: spin until the process has spent 50 ms of CPU time. What is
  // counted lies between that CPU time and the wall time it took.
  const double cpu0 = WorkClock::ProcessCpuSeconds();
  ASSERT_GT(cpu0, 0);
  const auto wall0 = std::chrono::steady_clock::now();
  const WorkClock busy = WorkClock::Start();
  volatile double sink = 0;
  while (WorkClock::ProcessCpuSeconds() - cpu0 < 0.05) sink = sink + 1;
  const double counted = busy.Seconds();
  const double wall =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count();
  EXPECT_GE(counted, 0.05 - 1e-3);
  EXPECT_LE(counted, wall);
  // Throttle::After(WorkClock) sleeps (factor - 1) x what the clock counts: for the idle wait,
  // next to nothing.
  EXPECT_LT(Throttle(3.0).After(idle), 0.2);
}

TEST(GemmTest, MeasuresSmallProducts) {
  // One fixed small size, no time budget: a positive, finite rate for fp32.
  const double fp32 = MeasureGemmGflops(GemmType::kFloat32, 64, 64, 0.0, 2);
  EXPECT_GT(fp32, 0);
  EXPECT_TRUE(std::isfinite(fp32));
  EXPECT_GE(MeasureGemmGflops(GemmType::kBFloat16, 64, 64, 0.0, 1), 0);
}

// The trainer reports every step through on_step, with tokens/s = this rank's tokens / step
// seconds, and the losses it returns; a throttle below 1 is refused by name.
TEST(TrainerReportTest, EveryStepIsReported) {
  TempDir tmp;
  WriteTextFile(tmp / "text.txt", shoal::testing::SyntheticText(60000));
  PrepareDataOptions prep;
  prep.inputs = {tmp / "text.txt"};
  prep.out_dir = tmp / "data";
  prep.progress = false;
  ASSERT_TRUE(PrepareData(prep).ok());
  ::setenv("SHOAL_CACHE_DIR", (tmp / "cache").c_str(), 1);

  auto config = ParseConfig(R"([model]
n_layer = 1
n_head = 2
n_embd = 32
block_size = 16
vocab_size = 256
[train]
steps = 4
batch_size = 2
log_every = 2
eval_every = 0
eval_batches = 1
)",
                            "test.toml",
                            {"data.dir=" + (tmp / "data"), "train.out_dir=" + (tmp / "out")});
  ASSERT_TRUE(config.ok()) << config.status();

  std::vector<StepReport> reports;
  TrainOptions options;
  options.log = false;
  options.throttle = 2.0;
  options.on_step = [&](const StepReport& r) { reports.push_back(r); };
  auto trainer = Trainer::Create(*config, options);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  auto result = (*trainer)->Run();
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(reports.size(), 4u);
  ASSERT_EQ(result->losses.size(), 4u);
  for (size_t i = 0; i < reports.size(); ++i) {
    EXPECT_EQ(reports[i].step, static_cast<int64_t>(i) + 1);
    EXPECT_EQ(reports[i].loss, result->losses[i]);
    EXPECT_GT(reports[i].lr, 0);
    ASSERT_GT(reports[i].step_seconds, 0);
    EXPECT_DOUBLE_EQ(reports[i].tokens_per_s, 2.0 * 16 / reports[i].step_seconds);
  }

  options.throttle = 0.5;
  auto refused = Trainer::Create(*config, options);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(refused.status().message().find("--throttle"), std::string::npos);
}

}  // namespace
}  // namespace shoal::runtime
