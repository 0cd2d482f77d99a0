// A real Prometheus (Debian's /usr/bin/prometheus) scrapes a real HttpStatusServer every second;
// the test reads the values back through Prometheus's query API. Prometheus's own parser is the
// judge of the exposition, and promtool's linter of the naming conventions.
#include <sys/wait.h>

#include <chrono>
#include <cmath>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "gtest/gtest.h"
#include "scheduler/http_status.h"
#include "tests/monitoring_util.h"
#include "tests/scheduler/sample_status.h"
#include "tests/test_util.h"

namespace shoal::scheduler {
namespace {

using ::shoal::testing::PrometheusServer;
using ::shoal::testing::RequireTool;
using ::shoal::testing::SampleClusterStatus;
using ::shoal::testing::SampleLoss;

constexpr char kJob[] = "shoal_coordinator";

// The value of the single sample an instant query returns; NaN (and a test failure) otherwise.
double QueryOne(const PrometheusServer& prometheus, const std::string& promql) {
  const auto r = prometheus.Query(promql);
  if (r.status != 200) {
    ADD_FAILURE() << promql << ": HTTP " << r.status << " " << r.error << " " << r.body;
    return std::nan("");
  }
  const auto json = nlohmann::json::parse(r.body, nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded() || json.value("status", "") != "success" ||
      json["data"]["result"].size() != 1) {
    ADD_FAILURE() << promql << ": expected one sample, got " << r.body;
    return std::nan("");
  }
  // An instant vector sample is [unix time, "value"].
  return std::stod(json["data"]["result"][0]["value"][1].get<std::string>());
}

TEST(PrometheusScrapeTest, RealPrometheusScrapesTheStatusPort) {
  const std::string missing = RequireTool(::shoal::testing::kPrometheusBinary);
  ASSERT_TRUE(missing.empty()) << missing;

  const v1::ClusterStatus status = SampleClusterStatus();
  auto server = HttpStatusServer::Start("127.0.0.1:0", [status] { return status; });
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string target = "127.0.0.1:" + std::to_string((*server)->port());

  std::string error;
  auto prometheus = PrometheusServer::Start({target}, kJob, &error);
  ASSERT_NE(prometheus, nullptr) << error;

  // Prometheus scrapes at an offset within its 1 s interval; wait (bounded) for the first one.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  bool seen = false;
  while (!seen && std::chrono::steady_clock::now() < deadline) {
    const auto r = prometheus->Query("shoal_job_step");
    const auto json = nlohmann::json::parse(r.body, nullptr, false);
    seen = r.status == 200 && !json.is_discarded() && json["data"]["result"].size() == 1;
    if (!seen) std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  ASSERT_TRUE(seen) << "no shoal_job_step in Prometheus after 30 s; its log:\n"
                    << prometheus->log();

  // The scrape itself succeeded: the target is up, with no parse error.
  EXPECT_EQ(QueryOne(*prometheus, "up{job=\"" + std::string(kJob) + "\"}"), 1);
  const auto targets = prometheus->Get("/api/v1/targets?state=active");
  ASSERT_EQ(targets.status, 200) << targets.error;
  const auto tj = nlohmann::json::parse(targets.body, nullptr, false);
  ASSERT_FALSE(tj.is_discarded());
  ASSERT_EQ(tj["data"]["activeTargets"].size(), 1u) << targets.body;
  EXPECT_EQ(tj["data"]["activeTargets"][0]["health"], "up") << targets.body;
  EXPECT_EQ(tj["data"]["activeTargets"][0]["lastError"], "") << targets.body;

  // The snapshot's values, as Prometheus stored them (the scrape adds job and instance labels).
  EXPECT_EQ(QueryOne(*prometheus, "shoal_job_step"), 1200);
  EXPECT_NEAR(QueryOne(*prometheus, "shoal_job_loss"), SampleLoss(1200), 1e-9);
  EXPECT_EQ(QueryOne(*prometheus, "shoal_workers{state=\"alive\"}"), 4);
  EXPECT_EQ(QueryOne(*prometheus, "shoal_workers{state=\"dead\"}"), 1);
  EXPECT_EQ(QueryOne(*prometheus, "sum(shoal_worker_up)"), 4);
  EXPECT_EQ(QueryOne(*prometheus, "shoal_worker_up{worker=\"rank4\"}"), 0);
  EXPECT_EQ(QueryOne(*prometheus, "sum(shoal_worker_tokens_per_second{device=\"cuda\"})"),
            41000 + 26500 + 25900);
  EXPECT_EQ(QueryOne(*prometheus, "shoal_layout_degree{dim=\"dp\"}"), 2);
  EXPECT_EQ(QueryOne(*prometheus, "shoal_joins_total{job=\"" + std::string(kJob) + "\"}"), 6);
  EXPECT_EQ(QueryOne(*prometheus, "count(shoal_build_info{version=\"0.1.0-test\"})"), 1);

  // SIGTERM is a clean shutdown for Prometheus: exit status 0.
  const int exit_status = prometheus->Stop();
  EXPECT_TRUE(WIFEXITED(exit_status) && WEXITSTATUS(exit_status) == 0)
      << "status " << exit_status << "; log:\n" << prometheus->log();
  (*server)->Stop();
}

TEST(PrometheusScrapeTest, PromtoolLintFindsNothing) {
  const std::string missing = RequireTool("/usr/bin/promtool");
  ASSERT_TRUE(missing.empty()) << missing;
  ::shoal::testing::TempDir dir;
  for (const v1::ClusterStatus& status : {SampleClusterStatus(), v1::ClusterStatus()}) {
    ::shoal::testing::WriteTextFile(dir / "metrics.txt", RenderPrometheus(status));
    // `check metrics` prints one line per naming or format problem and exits non-zero.
    const auto r = ::shoal::testing::RunCommand("/usr/bin/promtool check metrics < '" +
                                                (dir / "metrics.txt") + "'");
    EXPECT_EQ(r.exit_code, 0) << r.output;
    EXPECT_EQ(r.output, "");
  }
}

}  // namespace
}  // namespace shoal::scheduler
