// The backend conformance suite: the cases of conformance_cases.h, run as real processes.
//
//   - Gloo (the default run, and what ctest discovers): each test starts its ranks as copies of
//     this binary (rank_launcher.h) for worlds of 1, 2 and 4; they rendezvous through a TCP
//     store served by the test on a free port of 127.0.0.1, or through a file store.
//   - MPI: ctest runs `mpirun -np N comm_conformance_test --mpi` (tests/comm/CMakeLists.txt);
//     every rank then runs the same cases in the same order, each on a fresh backend.
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "comm/backend.h"
#include "comm/store.h"
#include "tests/comm/conformance_cases.h"
#include "tests/comm/rank_launcher.h"

namespace shoal::comm::conformance {
namespace {

using ::shoal::testing::EnvInt;
using ::shoal::testing::EnvString;

constexpr char kCaseEnv[] = "SHOAL_COMM_TEST_CASE";
constexpr char kWorldEnv[] = "SHOAL_COMM_TEST_WORLD";
constexpr char kStoreEnv[] = "SHOAL_COMM_TEST_STORE";  // "tcp:<port>" or "file:<path>"

const Case* FindCase(const std::string& name) {
  for (const Case& c : AllCases()) {
    if (name == c.name) return &c;
  }
  return nullptr;
}

// ---- Inside a Gloo rank process. ----

int RunGlooRank() {
  ::alarm(100);  // a rank never outlives its test by much, whatever happens
  const Case* c = FindCase(EnvString(kCaseEnv));
  const int rank = EnvInt(::shoal::testing::kRankEnv, -1);
  const int world = EnvInt(kWorldEnv, -1);
  const std::string store_spec = EnvString(kStoreEnv);
  if (c == nullptr || rank < 0 || world < 1) {
    std::fprintf(stderr, "rank process: bad environment\n");
    return 2;
  }
  absl::StatusOr<std::shared_ptr<Store>> store;
  if (store_spec.rfind("tcp:", 0) == 0) {
    TcpStoreOptions o;
    o.host = "127.0.0.1";
    o.port = std::stoi(store_spec.substr(4));
    o.world_size = world;
    o.timeout = c->backend_timeout;
    store = MakeTcpStore(o);
  } else {
    store = MakeFileStore(store_spec.substr(5), world, c->backend_timeout);
  }
  if (!store.ok()) {
    std::printf("rank %d: store: %s\n", rank, store.status().ToString().c_str());
    return 1;
  }
  BackendOptions o;
  o.kind = "gloo";
  o.rank = rank;
  o.world_size = world;
  o.store = MakePrefixStore(c->name, *store);
  o.timeout = c->backend_timeout;
  o.gloo_hostname = "127.0.0.1";
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<std::unique_ptr<Backend>> backend = CreateBackend(o);
  const double took =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (c->last_rank_missing) {
    const absl::Status& s = backend.status();
    std::printf("rank %d: rendezvous without rank %d: %s (%.2f s)\n", rank, world - 1,
                s.ToString().c_str(), took);
    // The message names who is missing (the ranks all run on this LibTorch, so the key layout
    // the backend reads it from is known).
    const bool ok = (absl::IsDeadlineExceeded(s) || absl::IsUnavailable(s)) && took < 20 &&
                    absl::StrContains(s.message(), "never arrived: rank " +
                                                        std::to_string(world - 1));
    return ok ? 0 : 1;
  }
  if (!backend.ok()) {
    std::printf("rank %d: CreateBackend: %s\n", rank, backend.status().ToString().c_str());
    return 1;
  }
  const absl::Status s = c->run(**backend);
  std::printf("rank %d: %s: %s\n", rank, c->name, s.ToString().c_str());
  std::fflush(stdout);
  backend->reset();
  return s.ok() ? 0 : 1;
}

// ---- The Gloo tests: one per case, world size and store kind. ----

class GlooCaseTest : public ::testing::Test {
 public:
  GlooCaseTest(const Case* c, int world, bool file_store)
      : case_(c), world_(world), file_store_(file_store) {}

  void TestBody() override {
    ::shoal::testing::TempDir dir;
    std::map<std::string, std::string> env{{kCaseEnv, case_->name},
                                           {kWorldEnv, std::to_string(world_)}};
    std::shared_ptr<Store> server;  // serves the ranks for the length of the test
    if (file_store_) {
      env[kStoreEnv] = "file:" + (dir / "store");
    } else {
      TcpStoreOptions o;
      o.port = 0;
      o.is_server = true;
      o.world_size = world_;
      o.timeout = absl::Seconds(30);
      absl::StatusOr<std::shared_ptr<Store>> s = MakeTcpStore(o);
      ASSERT_TRUE(s.ok()) << s.status();
      server = *s;
      ASSERT_GT(server->port(), 0);
      env[kStoreEnv] = "tcp:" + std::to_string(server->port());
    }
    std::vector<int> ranks;
    const int started = case_->last_rank_missing ? world_ - 1 : world_;
    for (int r = 0; r < started; ++r) ranks.push_back(r);
    const auto results = ::shoal::testing::LaunchRanks(ranks, env, std::chrono::seconds(90));
    for (const auto& r : results) {
      EXPECT_EQ(r.exit_code, 0) << "rank " << r.rank << "\n"
                                << ::shoal::testing::DescribeRanks(results);
    }
  }

 private:
  const Case* case_;
  const int world_;
  const bool file_store_;
};

void RegisterGlooTests() {
  for (int world : {1, 2, 4}) {
    for (bool file_store : {false, true}) {
      // The file store is a second way in, not a second suite: a few cases, worlds of 2.
      if (file_store && world != 2) continue;
      for (const Case& c : AllCases()) {
        if (!c.gloo || world < c.min_world) continue;
        if (file_store && !c.via_file_store) continue;
        const std::string suite =
            std::string("Gloo") + (file_store ? "File" : "Tcp") + "World" + std::to_string(world);
        const Case* cp = &c;
        ::testing::RegisterTest(suite.c_str(), c.name, nullptr, nullptr, __FILE__, __LINE__,
                                [=]() -> ::testing::Test* {
                                  return new GlooCaseTest(cp, world, file_store);
                                });
      }
    }
  }
}

// ---- MPI: every rank of an mpirun job runs the same tests in the same order. ----

class MpiCaseTest : public ::testing::Test {
 public:
  MpiCaseTest(const Case* c, int rank, int world) : case_(c), rank_(rank), world_(world) {}

  void TestBody() override {
    if (world_ < case_->min_world) GTEST_SKIP() << "needs " << case_->min_world << " ranks";
    BackendOptions o;
    o.kind = "mpi";
    o.rank = rank_;
    o.world_size = world_;
    o.timeout = case_->backend_timeout;
    absl::StatusOr<std::unique_ptr<Backend>> backend = CreateBackend(o);
    ASSERT_TRUE(backend.ok()) << "rank " << rank_ << ": " << backend.status();
    const absl::Status s = case_->run(**backend);
    EXPECT_TRUE(s.ok()) << "rank " << rank_ << ": " << s;
  }

 private:
  const Case* case_;
  const int rank_;
  const int world_;
};

// Ranks other than 0 print only their failures.
class FailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit FailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (r.failed()) {
      std::printf("[rank %d] FAILED %s:%d: %s\n", rank_, r.file_name() ? r.file_name() : "?",
                  r.line_number(), r.summary());
      std::fflush(stdout);
    }
  }

 private:
  const int rank_;
};

int RunUnderMpi() {
  const int rank = EnvInt("OMPI_COMM_WORLD_RANK", -1);
  const int world = EnvInt("OMPI_COMM_WORLD_SIZE", -1);
  if (rank < 0 || world < 1) {
    std::fprintf(stderr, "--mpi: not started by mpirun (no OMPI_COMM_WORLD_RANK/SIZE)\n");
    return 2;
  }
  const std::string suite = "MpiWorld" + std::to_string(world);
  // Options that disagree with mpirun are refused before any collective call.
  ::testing::RegisterTest(suite.c_str(), "WorldMismatchIsRefused", nullptr, nullptr, __FILE__,
                          __LINE__, [=]() -> ::testing::Test* {
                            struct T : ::testing::Test {
                              int rank, world;
                              T(int r, int w) : rank(r), world(w) {}
                              void TestBody() override {
                                BackendOptions o;
                                o.kind = "mpi";
                                o.rank = rank;
                                o.world_size = world + 1;
                                auto b = CreateBackend(o);
                                EXPECT_TRUE(absl::IsFailedPrecondition(b.status())) << b.status();
                              }
                            };
                            return new T(rank, world);
                          });
  for (const Case& c : AllCases()) {
    if (!c.mpi) continue;
    const Case* cp = &c;
    ::testing::RegisterTest(suite.c_str(), c.name, nullptr, nullptr, __FILE__, __LINE__,
                            [=]() -> ::testing::Test* { return new MpiCaseTest(cp, rank, world); });
  }
  if (rank > 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new FailurePrinter(rank));
  }
  return RUN_ALL_TESTS();
}

}  // namespace
}  // namespace shoal::comm::conformance

int main(int argc, char** argv) {
  if (::shoal::testing::IsRankProcess()) return shoal::comm::conformance::RunGlooRank();
  bool mpi = false;
  for (int i = 1; i < argc; ++i) mpi = mpi || std::strcmp(argv[i], "--mpi") == 0;
  ::testing::InitGoogleTest(&argc, argv);
  if (mpi) return shoal::comm::conformance::RunUnderMpi();
  shoal::comm::conformance::RegisterGlooTests();
  return RUN_ALL_TESTS();
}
