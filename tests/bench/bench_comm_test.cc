// `shoal bench comm` as its ranks run it: two real processes (Gloo, rendezvous through rank 0's
// TCP store) or an mpirun job (--mpi), small sizes. Rank 0's report must have a line per size,
// the loopback TCP figure, and the final JSON line.
//
// SHOAL_COMM_BENCH_MAX_BYTES / _ITERATIONS / _LOOPBACK_BYTES make it a real measurement:
//   SHOAL_COMM_BENCH_MAX_BYTES=268435456 ./comm_bench_test --gtest_filter=*Gloo* (prints rank 0)
#include "bench/comm_bench.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <iostream>
#include <sstream>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "tests/comm/rank_launcher.h"
#include "tests/test_util.h"

namespace shoal::bench {
namespace {

using ::shoal::testing::EnvInt;

CommBenchOptions SmallBench(const std::string& backend, int rank, int world) {
  CommBenchOptions o;
  o.backend = backend;
  o.rank = rank;
  o.world_size = world;
  o.min_bytes = 4 << 10;
  o.max_bytes = EnvInt("SHOAL_COMM_BENCH_MAX_BYTES", 64 << 10);
  o.iterations = EnvInt("SHOAL_COMM_BENCH_ITERATIONS", 3);
  o.loopback_bytes = EnvInt("SHOAL_COMM_BENCH_LOOPBACK_BYTES", 8 << 20);
  o.timeout = absl::Seconds(60);
  return o;
}

// Empty when rank 0's report has what it must; else what is missing.
std::string CheckReport(const std::string& report, int sizes) {
  int lines = 0;
  bool json = false;
  for (absl::string_view line : absl::StrSplit(report, '\n')) {
    lines += absl::StartsWith(line, "allreduce ");
    json = json || (absl::StartsWith(line, R"({"bench":"comm")") && absl::EndsWith(line, "]}"));
  }
  if (lines != sizes) return "expected " + std::to_string(sizes) + " size lines";
  if (!json) return "no JSON line";
  if (!absl::StrContains(report, "tcp loopback 127.0.0.1:")) return "no loopback line";
  if (absl::StrContains(report, "\"tcp_loopback_gbps\":null")) return "loopback failed";
  return "";
}

// A rank process: runs the bench; rank 0 prints its report and checks it.
int RunRank(const std::string& backend, int rank, int world) {
  ::alarm(100);
  CommBenchOptions o = SmallBench(backend, rank, world);
  o.master_port = EnvInt("SHOAL_COMM_TEST_PORT", 29500);
  std::ostringstream report;
  o.out = &report;
  const absl::Status s = RunCommBench(o);
  std::cout << report.str() << std::flush;
  if (!s.ok()) {
    std::cout << "rank " << rank << ": " << s << "\n";
    return 1;
  }
  if (rank == 0) {
    int sizes = 0;
    for (int64_t b = o.min_bytes; b <= o.max_bytes; b *= 4) ++sizes;
    const std::string problem = CheckReport(report.str(), sizes);
    if (!problem.empty()) {
      std::cout << "rank 0: report: " << problem << "\n";
      return 1;
    }
  }
  return 0;
}

TEST(CommBenchTest, GlooTwoRanksReportEverySizeLoopbackAndJson) {
  // Rank 0 serves the store itself; the port is probed free here (a small race, rarely lost).
  const auto results = ::shoal::testing::LaunchRanks(
      {0, 1}, {{"SHOAL_COMM_TEST_PORT", std::to_string(::shoal::testing::FreePort())}}, std::chrono::seconds(100));
  for (const auto& r : results) {
    EXPECT_EQ(r.exit_code, 0) << ::shoal::testing::DescribeRanks(results);
  }
  std::cout << results[0].output;
}

TEST(CommBenchTest, BadSizesAreInvalidArgument) {
  CommBenchOptions o;
  o.min_bytes = 6;
  EXPECT_TRUE(absl::IsInvalidArgument(RunCommBench(o)));
  o.min_bytes = 4096;
  o.max_bytes = 1024;
  EXPECT_TRUE(absl::IsInvalidArgument(RunCommBench(o)));
}

}  // namespace
}  // namespace shoal::bench

int main(int argc, char** argv) {
  if (::shoal::testing::IsRankProcess()) {
    return shoal::bench::RunRank("gloo", shoal::testing::EnvInt(shoal::testing::kRankEnv, 0), 2);
  }
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--mpi") == 0) {
      const int rank = shoal::testing::EnvInt("OMPI_COMM_WORLD_RANK", -1);
      const int world = shoal::testing::EnvInt("OMPI_COMM_WORLD_SIZE", -1);
      if (rank < 0) return 2;
      return shoal::bench::RunRank("mpi", rank, world);
    }
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
