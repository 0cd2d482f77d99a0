// The coordinator over real gRPC on 127.0.0.1: a real server (port 0) and the real client. Watch
// streams across joins and drains, authentication on every method, TLS with certificates made by
// the openssl CLI, the message size cap, validation errors, lease expiry, shutdown with open
// streams, and the `shoal coordinator` / `shoal status` processes.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "comm/coordinator_client.h"
#include "scheduler/coordinator_service.h"
#include "tests/scheduler/test_job.h"
#include "tests/test_util.h"

namespace shoal::scheduler {
namespace {

using shoal::testing::RunCommand;
using shoal::testing::TempDir;

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

v1::JobSpec Job(int expected_workers) {
  return ::shoal::testing::SmallJob("service-test", expected_workers);
}

v1::JoinRequest JoinReq(const std::string& name, const std::string& host, int expected = 2) {
  v1::JoinRequest r;
  r.set_protocol_version(kProtocolVersion);
  v1::DeviceProfile* p = r.mutable_device();
  p->set_host(host);
  p->set_kind(v1::DEVICE_KIND_CPU);
  p->set_device_name("test CPU");
  p->mutable_memory()->set_host_bytes(static_cast<int64_t>(16 * kGiB));
  p->set_fp32_gflops(100);
  p->set_cores(4);
  p->set_throttle(1);
  *r.mutable_job() = Job(expected);
  r.set_mesh_rank(-1);
  r.set_name(name);
  return r;
}

std::unique_ptr<CoordinatorServer> MustStart(CoordinatorServerOptions options) {
  auto s = CoordinatorServer::Start(options);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? std::move(*s) : nullptr;
}

std::unique_ptr<comm::CoordinatorClient> MustConnect(const std::string& address,
                                                     const std::string& token = "",
                                                     const std::string& ca = "") {
  comm::CoordinatorClientOptions o;
  o.address = address;
  o.token = token;
  o.tls_ca_file = ca;
  o.timeout = absl::Seconds(20);
  auto c = comm::CoordinatorClient::Connect(o);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? std::move(*c) : nullptr;
}

std::string Local(int port) { return absl::StrCat("127.0.0.1:", port); }

// Collects what a watch stream delivers, so the test can wait for a given message.
class Watcher {
 public:
  Watcher(comm::CoordinatorClient* client, const std::string& id, uint64_t stop_at_version)
      : thread_([=] {
          absl::Status s = client->WatchAssignments(
              id,
              [&](const v1::Assignment& a) {
                absl::MutexLock lock(&mu_);
                seen_.push_back(a);
                return a.version() < stop_at_version;
              },
              absl::Seconds(60));
          absl::MutexLock lock(&mu_);
          result_ = s;
          done_ = true;
        }) {}
  ~Watcher() { Join(); }
  void Join() {
    if (thread_.joinable()) thread_.join();
  }
  // True once `n` messages arrived (waits at most 30 s).
  bool WaitForCount(size_t n) {
    absl::MutexLock lock(&mu_);
    auto enough = [&] { return seen_.size() >= n || done_; };
    mu_.AwaitWithTimeout(absl::Condition(&enough), absl::Seconds(30));
    return seen_.size() >= n;
  }
  std::vector<v1::Assignment> seen() {
    absl::MutexLock lock(&mu_);
    return seen_;
  }
  absl::Status result() {
    Join();
    return result_;
  }

 private:
  absl::Mutex mu_;
  std::vector<v1::Assignment> seen_;
  bool done_ = false;
  absl::Status result_;
  std::thread thread_;
};

TEST(ServiceTest, WatchStreamFollowsJoinsAndDrains) {
  auto server = MustStart({});
  ASSERT_NE(server, nullptr);
  auto client = MustConnect(Local(server->port()));
  auto a = client->Join(JoinReq("a", "h0"));
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->worker_id(), "a");

  Watcher watch_a(client.get(), "a", /*stop_at_version=*/3);
  ASSERT_TRUE(watch_a.WaitForCount(1));
  EXPECT_EQ(watch_a.seen()[0].version(), 0u);  // waiting for the second worker

  // The job expects 2 workers: the second join brings layout v1, a third v2.
  ASSERT_TRUE(client->Join(JoinReq("b", "h1")).ok());
  ASSERT_TRUE(watch_a.WaitForCount(2));
  EXPECT_EQ(watch_a.seen()[1].version(), 1u);
  EXPECT_TRUE(watch_a.seen()[1].placed());
  ASSERT_TRUE(client->Join(JoinReq("c", "h2")).ok());

  // Draining c leaves the 2 expected workers: v3 without c.
  auto layout = client->Drain("c");
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_EQ(layout->version(), 3u);
  for (const auto& p : layout->placements()) EXPECT_NE(p.worker_id(), "c");
  ASSERT_TRUE(watch_a.result().ok()) << watch_a.result();
  ASSERT_EQ(watch_a.seen().back().version(), 3u);
  EXPECT_TRUE(watch_a.seen().back().placed());

  // c's stream starts with its drain order, and ends (kFailedPrecondition) once it leaves.
  Watcher watch_c(client.get(), "c", /*stop_at_version=*/1000);
  ASSERT_TRUE(watch_c.WaitForCount(1));
  EXPECT_TRUE(watch_c.seen()[0].drain());
  EXPECT_FALSE(watch_c.seen()[0].placed());
  auto hb = client->Heartbeat([] {
    v1::HeartbeatRequest r;
    r.set_worker_id("c");
    return r;
  }());
  ASSERT_TRUE(hb.ok());
  EXPECT_TRUE(hb->drain());
  ASSERT_TRUE(client->Leave("c", "drained").ok());
  EXPECT_EQ(watch_c.result().code(), absl::StatusCode::kFailedPrecondition) << watch_c.result();

  // c was no longer usable when it left, so no new layout: a stays on version 3.
  auto current = client->WaitForAssignment("a", 3, absl::Seconds(30));
  ASSERT_TRUE(current.ok()) << current.status();
  EXPECT_EQ(current->version(), 3u);
}

TEST(ServiceTest, EveryMethodNeedsTheToken) {
  CoordinatorServerOptions o;
  o.token = "s3cret-token";
  auto server = MustStart(o);
  ASSERT_NE(server, nullptr);
  for (const std::string token : {"", "wrong-token", "s3cret-tokenX"}) {
    SCOPED_TRACE(token);
    auto c = MustConnect(Local(server->port()), token);
    const auto kUnauth = absl::StatusCode::kUnauthenticated;
    EXPECT_EQ(c->Join(JoinReq("a", "h0")).status().code(), kUnauth);
    EXPECT_EQ(c->Heartbeat(v1::HeartbeatRequest()).status().code(), kUnauth);
    EXPECT_EQ(c->Leave("a", "").code(), kUnauth);
    EXPECT_EQ(c->GetStatus().status().code(), kUnauth);
    EXPECT_EQ(c->Drain("a").status().code(), kUnauth);
    EXPECT_EQ(c->Rebalance().status().code(), kUnauth);
    EXPECT_EQ(c->MeasureRttMs(1).status().code(), kUnauth);
    EXPECT_EQ(c->WatchAssignments("a", [](const v1::Assignment&) { return true; },
                                  absl::Seconds(20))
                  .code(),
              kUnauth);
  }
  // 3 clients x 8 methods refused before reaching the core.
  EXPECT_EQ(server->core().Status().counters().rejected_requests_total(), 24);
  EXPECT_EQ(server->core().Status().workers_size(), 0);
  auto good = MustConnect(Local(server->port()), "s3cret-token");
  ASSERT_TRUE(good->Join(JoinReq("a", "h0")).ok());
  auto status = good->GetStatus();
  ASSERT_TRUE(status.ok()) << status.status();
  EXPECT_EQ(status->workers_size(), 1);
  EXPECT_TRUE(good->MeasureRttMs(3).ok());
}

// A self-signed certificate for localhost and 127.0.0.1, made by the openssl CLI.
bool MakeCert(const TempDir& dir, const std::string& name) {
  const auto r = RunCommand(absl::StrCat(
      "openssl req -x509 -newkey rsa:2048 -nodes -keyout ", dir / (name + ".key"), " -out ",
      dir / (name + ".crt"),
      " -days 2 -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1"));
  EXPECT_EQ(r.exit_code, 0) << r.output;
  return r.exit_code == 0;
}

TEST(ServiceTest, TlsClientsWorkAndPlaintextOnesAreRefused) {
  TempDir dir;
  ASSERT_TRUE(MakeCert(dir, "server"));
  CoordinatorServerOptions o;
  o.tls_cert_file = dir / "server.crt";
  o.tls_key_file = dir / "server.key";
  o.token = "tok";
  auto server = MustStart(o);
  ASSERT_NE(server, nullptr);

  auto tls = MustConnect(Local(server->port()), "tok", dir / "server.crt");
  auto status = tls->GetStatus();
  ASSERT_TRUE(status.ok()) << status.status();
  auto by_name = MustConnect(absl::StrCat("localhost:", server->port()), "tok",
                             dir / "server.crt");
  ASSERT_TRUE(by_name->Join(JoinReq("a", "h0")).ok());

  comm::CoordinatorClientOptions plain_options;
  plain_options.address = Local(server->port());
  plain_options.token = "tok";
  plain_options.timeout = absl::Seconds(5);
  auto plain = comm::CoordinatorClient::Connect(plain_options);
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ((*plain)->GetStatus().status().code(), absl::StatusCode::kUnavailable);

  // A client that trusts another certificate refuses this server.
  ASSERT_TRUE(MakeCert(dir, "other"));
  auto wrong_ca = MustConnect(Local(server->port()), "tok", dir / "other.crt");
  EXPECT_EQ(wrong_ca->GetStatus().status().code(), absl::StatusCode::kUnavailable);
}

TEST(ServiceTest, BadTlsFilesAreNamed) {
  TempDir dir;
  ASSERT_TRUE(MakeCert(dir, "a"));
  ASSERT_TRUE(MakeCert(dir, "b"));
  CoordinatorServerOptions o;
  o.tls_cert_file = dir / "a.crt";
  auto s = CoordinatorServer::Start(o);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("--tls-key"), std::string::npos) << s.status();

  o.tls_key_file = dir / "missing.key";
  s = CoordinatorServer::Start(o);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(s.status().message().find("missing.key"), std::string::npos) << s.status();

  shoal::testing::WriteTextFile(dir / "garbage.key", "not a key\n");
  o.tls_key_file = dir / "garbage.key";
  s = CoordinatorServer::Start(o);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("garbage.key"), std::string::npos) << s.status();

  o.tls_key_file = dir / "b.key";  // another certificate's key
  s = CoordinatorServer::Start(o);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("does not belong"), std::string::npos) << s.status();

  comm::CoordinatorClientOptions co;
  co.address = "127.0.0.1:1";
  co.tls_ca_file = dir / "nope.crt";
  EXPECT_EQ(comm::CoordinatorClient::Connect(co).status().code(), absl::StatusCode::kNotFound);
}

TEST(ServiceTest, OversizedMessagesAreRefused) {
  CoordinatorServerOptions o;
  o.max_message_bytes = 64 << 10;
  auto server = MustStart(o);
  ASSERT_NE(server, nullptr);
  auto client = MustConnect(Local(server->port()));
  auto small = client->MeasureUploadGbps(32 << 10, 1);
  ASSERT_TRUE(small.ok()) << small.status();
  EXPECT_GT(*small, 0);
  auto big = client->MeasureUploadGbps(200 << 10, 1);
  EXPECT_EQ(big.status().code(), absl::StatusCode::kResourceExhausted) << big.status();
  v1::JoinRequest huge = JoinReq("a", "h0");
  huge.mutable_device()->set_device_name(std::string(100 << 10, 'x'));
  EXPECT_EQ(client->Join(huge).status().code(), absl::StatusCode::kResourceExhausted);
}

TEST(ServiceTest, BadFieldsAreInvalidArgumentNamingTheField) {
  auto server = MustStart({});
  ASSERT_NE(server, nullptr);
  auto client = MustConnect(Local(server->port()));
  v1::JoinRequest r = JoinReq("a", "h0");
  r.mutable_device()->mutable_memory()->set_host_bytes(-5);
  auto j = client->Join(r);
  ASSERT_EQ(j.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(j.status().message().find("device.memory.host_bytes"), std::string::npos);
  EXPECT_EQ(j.status().message().rfind("Join: ", 0), 0u) << j.status();  // the call's name
  r = JoinReq("a", "h0");
  r.mutable_job()->mutable_model()->set_n_embd(130);
  j = client->Join(r);
  ASSERT_EQ(j.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(j.status().message().find("job.model.n_embd"), std::string::npos) << j.status();
  EXPECT_EQ(client->Drain("has space").status().code(), absl::StatusCode::kInvalidArgument);
  v1::HeartbeatRequest hb;
  hb.set_worker_id("a");
  hb.mutable_stats()->set_loss(std::nan(""));
  auto h = client->Heartbeat(hb);
  ASSERT_EQ(h.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(h.status().message().find("stats.loss"), std::string::npos) << h.status();
  EXPECT_EQ(client->Heartbeat([] {
                      v1::HeartbeatRequest x;
                      x.set_worker_id("nobody");
                      return x;
                    }())
                .status()
                .code(),
            absl::StatusCode::kNotFound);
}

TEST(ServiceTest, ExpiredLeaseShowsDeadInTheStatus) {
  CoordinatorServerOptions o;
  o.core.lease_ms = 300;
  o.core.heartbeat_interval_ms = 100;
  auto server = MustStart(o);
  ASSERT_NE(server, nullptr);
  auto client = MustConnect(Local(server->port()));
  auto j = client->Join(JoinReq("", "h0", 0));
  ASSERT_TRUE(j.ok()) << j.status();
  EXPECT_EQ(j->lease_ms(), 300);
  // The sweeper runs every lease/4; no heartbeat is sent, so the worker must turn DEAD.
  v1::WorkerState state = v1::WORKER_STATE_ALIVE;
  for (int i = 0; i < 300 && state != v1::WORKER_STATE_DEAD; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    auto s = client->GetStatus();
    ASSERT_TRUE(s.ok()) << s.status();
    state = s->workers(0).state();
  }
  EXPECT_EQ(state, v1::WORKER_STATE_DEAD);
  auto hb = client->Heartbeat([&] {
    v1::HeartbeatRequest r;
    r.set_worker_id(j->worker_id());
    return r;
  }());
  EXPECT_EQ(hb.status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(ServiceTest, ShutdownEndsOpenStreams) {
  auto server = MustStart({});
  ASSERT_NE(server, nullptr);
  auto client = MustConnect(Local(server->port()));
  ASSERT_TRUE(client->Join(JoinReq("a", "h0")).ok());
  Watcher watch(client.get(), "a", 1000);
  ASSERT_TRUE(watch.WaitForCount(1));
  server->Shutdown();
  const absl::Status s = watch.result();
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.code(), absl::StatusCode::kDeadlineExceeded) << s;  // ended by the server
  server->Shutdown();  // idempotent
}

TEST(ServiceTest, BusyPortIsUnavailable) {
  auto first = MustStart({});
  ASSERT_NE(first, nullptr);
  CoordinatorServerOptions o;
  o.listen = Local(first->port());
  EXPECT_EQ(CoordinatorServer::Start(o).status().code(), absl::StatusCode::kUnavailable);
  o.listen = "no-port";
  EXPECT_EQ(CoordinatorServer::Start(o).status().code(), absl::StatusCode::kInvalidArgument);
}

// `shoal coordinator` as a child process, stopped with SIGTERM.
class CoordinatorProcess {
 public:
  explicit CoordinatorProcess(const std::vector<std::string>& args, const std::string& log) {
    pid_ = ::fork();
    if (pid_ == 0) {
      std::vector<char*> argv;
      argv.push_back(const_cast<char*>(SHOAL_BINARY));
      for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      ::execv(SHOAL_BINARY, argv.data());
      ::_exit(127);
    }
  }
  ~CoordinatorProcess() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  // Exit code after SIGTERM (128 + signal if it died of one).
  int Terminate() {
    ::kill(pid_, SIGTERM);
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_ = -1;
};

int WaitForPort(const std::string& port_file) {
  for (int i = 0; i < 600; ++i) {
    const std::string text = shoal::testing::ReadTextFile(port_file);
    auto j = nlohmann::json::parse(text, nullptr, false);
    if (j.is_object() && j.contains("grpc")) return j["grpc"].get<int>();
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return 0;
}

TEST(ServiceTest, CoordinatorAndStatusProcesses) {
  TempDir dir;
  shoal::testing::WriteTextFile(dir / "token", "proc-token\n");
  CoordinatorProcess coordinator({"coordinator", "--listen", "127.0.0.1:0", "--token-file",
                                  dir / "token", "--port-file", dir / "ports.json", "--lease-s",
                                  "30", "--heartbeat-s", "1"},
                                 dir / "coordinator.log");
  const int port = WaitForPort(dir / "ports.json");
  ASSERT_GT(port, 0) << shoal::testing::ReadTextFile(dir / "coordinator.log");
  auto client = MustConnect(Local(port), "proc-token");
  ASSERT_TRUE(client->Join(JoinReq("alpha", "node-a", 1)).ok());
  v1::HeartbeatRequest hb;
  hb.set_worker_id("alpha");
  hb.mutable_stats()->set_step(42);
  hb.mutable_stats()->set_loss(2.5);
  hb.mutable_stats()->set_tokens_per_s(1234);
  ASSERT_TRUE(client->Heartbeat(hb).ok());

  const std::string status_cmd = absl::StrCat(SHOAL_BINARY, " status --coordinator ", Local(port),
                                              " --token-file ", dir / "token");
  auto table = RunCommand(status_cmd);
  ASSERT_EQ(table.exit_code, 0) << table.output;
  EXPECT_NE(table.output.find("health: healthy"), std::string::npos) << table.output;
  EXPECT_NE(table.output.find("alpha"), std::string::npos);
  EXPECT_NE(table.output.find("node-a"), std::string::npos);
  EXPECT_NE(table.output.find("step 42"), std::string::npos);
  EXPECT_NE(table.output.find("1,234"), std::string::npos);
  EXPECT_NE(table.output.find("ALIVE"), std::string::npos);

  auto json = RunCommand(status_cmd + " --json 2>/dev/null");
  ASSERT_EQ(json.exit_code, 0) << json.output;
  auto j = nlohmann::json::parse(json.output, nullptr, false);
  ASSERT_TRUE(j.is_object()) << json.output;
  EXPECT_EQ(j["health"], "healthy");
  EXPECT_EQ(j["workers"][0]["worker_id"], "alpha");
  EXPECT_EQ(j["job_status"]["step"], "42");  // proto3 JSON: int64 as a string
  EXPECT_EQ(j["layout"]["version"], "1");

  auto no_token = RunCommand(absl::StrCat(SHOAL_BINARY, " status --coordinator ", Local(port)));
  EXPECT_EQ(no_token.exit_code, 1) << no_token.output;
  EXPECT_NE(no_token.output.find("UNAUTHENTICATED"), std::string::npos) << no_token.output;

  EXPECT_EQ(coordinator.Terminate(), 0);
  const std::string log = shoal::testing::ReadTextFile(dir / "coordinator.log");
  EXPECT_NE(log.find(absl::StrCat("coordinator: listening on 127.0.0.1:", port, " (grpc)")),
            std::string::npos)
      << log;
  EXPECT_NE(log.find("join: alpha"), std::string::npos) << log;
  EXPECT_NE(log.find("layout v1"), std::string::npos) << log;
}

TEST(ServiceTest, BadFlagsExitWithTwo) {
  // Each case names the flag it expects in the message. (Every run loads the whole binary, about
  // a second here, so the list is kept short; the parsing itself is CLI11's.)
  const std::string shoal = SHOAL_BINARY;
  const std::vector<std::pair<std::string, std::string>> cases = {
      {" coordinator", "--listen"},
      {" coordinator --listen 127.0.0.1:0 --lease-s -1", "--lease-s"},
      {" coordinator --listen 127.0.0.1:0 --tls-cert /nonexistent.crt", "--tls-key"},
      {" coordinator --listen 127.0.0.1:0 --token-file /nonexistent-token", "/nonexistent-token"},
      {" status", "--coordinator"},
      {" status --coordinator 127.0.0.1:1 --tls-ca /nonexistent.pem", "/nonexistent.pem"},
  };
  for (const auto& [args, named] : cases) {
    auto r = RunCommand(shoal + args);
    EXPECT_EQ(r.exit_code, 2) << args << "\n" << r.output;
    EXPECT_NE(r.output.find(named), std::string::npos) << args << "\n" << r.output;
  }
}

TEST(ServiceTest, MalformedCoordinatorAddressesAreRefusedBeforeAnyCall) {
  for (const char* address : {"127.0.0.1:", "localhost:0", "host:65536", "host:http", ":7070",
                              "7070"}) {
    comm::CoordinatorClientOptions o;
    o.address = address;
    auto c = comm::CoordinatorClient::Connect(o);
    ASSERT_FALSE(c.ok()) << address;
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << address;
    EXPECT_NE(c.status().message().find(address), std::string::npos) << c.status();
  }
}

TEST(ServiceTest, StatusAgainstADeadPortFailsWithinItsTimeout) {
  const int port = shoal::testing::FreePort();
  const auto t0 = std::chrono::steady_clock::now();
  auto r = RunCommand(absl::StrCat(SHOAL_BINARY, " status --coordinator 127.0.0.1:", port,
                                   " --timeout-s 3"));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find(absl::StrCat("127.0.0.1:", port)), std::string::npos) << r.output;
  // A loose bound: the 3 s deadline plus process start, far below the test's timeout.
  EXPECT_LT(seconds, 20) << r.output;
}

}  // namespace
}  // namespace shoal::scheduler
