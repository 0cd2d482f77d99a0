// deploy/cloud/: the systemd unit, its settings and the cloud-init file that start a swarm worker
// on a preemptible instance, and the preemption watch (`shoal worker --preemption-url`).
//   - the watch's HTTP GET and notice rule against a local fake metadata endpoint (GCP's header
//     rule: 403 without `Metadata-Flavor: Google`; "FALSE" until the notice, then "TRUE"; AWS's
//     404 until the notice);
//   - the unit, worker.env.example and cloud-init.yaml agree (the cloud-init file embeds the other
//     two), Restart=on-failure, TimeoutStopSec above the grace;
//   - the unit's ExecStart, expanded as systemd expands it from the settings, joins a real swarm
//     coordinator on 127.0.0.1 and, when the fake endpoint turns to "TRUE", drains and exits 0
//     within its grace, the coordinator counting the leave.
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/net_util.h"
#include "launch/preemption_watch.h"
#include "tests/json_util.h"
#include "tests/monitoring_util.h"
#include "tests/test_util.h"

namespace shoal {
namespace {

using testing::Contains;
using testing::ReadTextFile;
using testing::WaitUntil;

// An instance-metadata endpoint on 127.0.0.1: GCP's `preempted` path (needs the flavour header)
// and AWS's `instance-action` (404 until the notice).
class FakeMetadata {
 public:
  FakeMetadata() {
    fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    EXPECT_EQ(listen(fd_, 16), 0);
    socklen_t len = sizeof(a);
    getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    thread_ = std::thread([this] { Serve(); });
  }
  ~FakeMetadata() {
    stop_ = true;
    thread_.join();
    close(fd_);
  }
  std::string Url(const std::string& path) const {
    return "http://127.0.0.1:" + std::to_string(port_) + path;
  }
  void Preempt() { preempted_ = true; }
  int polls() const { return polls_; }

 private:
  void Serve() {
    while (!stop_) {
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, 100) != 1) continue;
      const int c = accept(fd_, nullptr, nullptr);
      if (c < 0) continue;
      std::string request;
      char buf[1024];
      while (request.find("\r\n\r\n") == std::string::npos) {
        pollfd q{c, POLLIN, 0};
        if (poll(&q, 1, 2000) != 1) break;
        const ssize_t n = recv(c, buf, sizeof(buf), 0);
        if (n <= 0) break;
        request.append(buf, static_cast<size_t>(n));
      }
      ++polls_;
      int status = 404;
      std::string body = "not found";
      if (request.rfind("GET /computeMetadata/v1/instance/preempted ", 0) == 0) {
        if (request.find("\r\nMetadata-Flavor:Google\r\n") == std::string::npos &&
            request.find("\r\nMetadata-Flavor: Google\r\n") == std::string::npos) {
          status = 403;
          body = "missing the Metadata-Flavor header";
        } else {
          status = 200;
          body = preempted_ ? "TRUE" : "FALSE";
        }
      } else if (request.rfind("GET /latest/meta-data/spot/instance-action ", 0) == 0 &&
                 preempted_) {
        status = 200;
        body = R"({"action": "terminate", "time": "2026-12-05T20:00:00Z"})";
      }
      const std::string reply = "HTTP/1.0 " + std::to_string(status) + " X\r\nContent-Length: " +
                                std::to_string(body.size()) + "\r\n\r\n" + body;
      (void)send(c, reply.data(), reply.size(), MSG_NOSIGNAL);
      close(c);
    }
  }

  int fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false}, preempted_{false};
  std::atomic<int> polls_{0};
  std::thread thread_;
};

TEST(PreemptionWatchTest, HttpGetAndTheNoticeRule) {
  EXPECT_FALSE(launch::IsPreemptionNotice(200, ""));
  EXPECT_FALSE(launch::IsPreemptionNotice(200, " FALSE\n"));
  EXPECT_FALSE(launch::IsPreemptionNotice(404, "TRUE"));
  EXPECT_TRUE(launch::IsPreemptionNotice(200, "TRUE"));
  EXPECT_TRUE(launch::IsPreemptionNotice(200, R"({"action": "stop"})"));

  FakeMetadata md;
  const std::string gcp = md.Url("/computeMetadata/v1/instance/preempted");
  const std::string aws = md.Url("/latest/meta-data/spot/instance-action");
  const std::vector<std::string> flavour = {"Metadata-Flavor:Google"};
  auto get = [](const std::string& url, const std::vector<std::string>& headers) {
    absl::StatusOr<HttpReply> r = HttpGet(url, headers, absl::Seconds(5));
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *r : HttpReply{};
  };
  EXPECT_EQ(get(gcp, {}).status, 403);
  HttpReply before = get(gcp, flavour);
  EXPECT_EQ(before.status, 200);
  EXPECT_EQ(before.body, "FALSE");
  EXPECT_EQ(get(aws, {}).status, 404);
  md.Preempt();
  HttpReply after = get(gcp, flavour);
  EXPECT_TRUE(launch::IsPreemptionNotice(after.status, after.body)) << after.body;
  HttpReply action = get(aws, {});
  EXPECT_TRUE(launch::IsPreemptionNotice(action.status, action.body)) << action.body;

  // What cannot be sent is refused before anything is dialled.
  EXPECT_EQ(CheckHttpGet("https://metadata/x", {}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CheckHttpGet("http://", {}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CheckHttpGet("http://h/a b", {}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CheckHttpGet(gcp, {"no colon"}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CheckHttpGet(gcp, {"X: a\r\nY: b"}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(CheckHttpGet("http://[::1]/x", {}).ok());
  // Nothing listening: unavailable, not a notice.
  EXPECT_EQ(HttpGet("http://127.0.0.1:1/x", {}, absl::Seconds(2)).status().code(),
            absl::StatusCode::kUnavailable);
}

std::string DeployFile(const std::string& name) {
  return ReadTextFile(std::string(SHOAL_SOURCE_DIR) + "/deploy/cloud/" + name);
}

// KEY=VALUE lines (comments and blank lines skipped): the settings file, and the unit's keys
// (its sections do not repeat one).
std::map<std::string, std::string> EnvFile(const std::string& text) {
  std::map<std::string, std::string> out;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    const size_t eq = line.find('=');
    if (eq == absl::string_view::npos) continue;
    out[std::string(line.substr(0, eq))] = std::string(line.substr(eq + 1));
  }
  return out;
}


// ExecStart as systemd expands it: ${X} one word, $X split on whitespace.
std::vector<std::string> Expand(const std::string& exec,
                                const std::map<std::string, std::string>& env) {
  std::vector<std::string> argv;
  for (absl::string_view word : absl::StrSplit(exec, ' ', absl::SkipEmpty())) {
    std::string w(word);
    if (w.size() > 3 && w.rfind("${", 0) == 0 && w.back() == '}') {
      argv.push_back(env.at(w.substr(2, w.size() - 3)));
    } else if (w.size() > 1 && w[0] == '$') {
      for (absl::string_view part : absl::StrSplit(env.at(w.substr(1)), ' ', absl::SkipEmpty())) {
        argv.emplace_back(part);
      }
    } else {
      argv.push_back(w);
    }
  }
  return argv;
}

TEST(DeployCloudTest, TheUnitItsSettingsAndTheCloudInitFileAgree) {
  const std::string unit = DeployFile("shoal-worker.service");
  const std::string env_text = DeployFile("worker.env.example");
  const std::string cloud_init = DeployFile("cloud-init.yaml");
  const std::map<std::string, std::string> keys = EnvFile(unit);
  const std::map<std::string, std::string> env = EnvFile(env_text);
  EXPECT_EQ(keys.at("Restart"), "on-failure");
  EXPECT_EQ(keys.at("KillSignal"), "SIGTERM");
  EXPECT_EQ(keys.at("EnvironmentFile"), "/etc/shoal/worker.env");
  // The stop timeout leaves the grace and the leave itself room.
  EXPECT_GE(std::stod(keys.at("TimeoutStopSec")), std::stod(env.at("SHOAL_GRACE_S")) + 10);
  const std::vector<std::string> argv = Expand(keys.at("ExecStart"), env);
  ASSERT_GE(argv.size(), 3u);
  EXPECT_EQ(argv[0], "/usr/local/bin/shoal");
  EXPECT_EQ(argv[1], "worker");
  EXPECT_TRUE(Contains(keys.at("ExecStart"), "--grace-s ${SHOAL_GRACE_S}"));
  // cloud-init.yaml carries both files, indented, line for line.
  auto embedded = [&](const std::string& text) {
    for (absl::string_view line : absl::StrSplit(text, '\n')) {
      if (absl::StripAsciiWhitespace(line).empty()) continue;
      if (!Contains(cloud_init, "      " + std::string(line) + "\n")) return std::string(line);
    }
    return std::string();
  };
  EXPECT_EQ(embedded(unit), "") << "cloud-init.yaml lacks this line of the unit";
  EXPECT_EQ(embedded(env_text), "") << "cloud-init.yaml lacks this line of worker.env.example";
  EXPECT_TRUE(Contains(cloud_init, "systemctl enable --now shoal-worker.service"));
}

TEST(DeployCloudTest, TheUnitsCommandJoinsAndDrainsAtThePreemptionNotice) {
  ::setenv("OMP_NUM_THREADS", "1", 1);
  ::setenv("OPENBLAS_NUM_THREADS", "1", 1);
  testing::TempDir tmp;
  testing::WriteTextFile(tmp / "token", "cloud-token\n");
  const std::string ports = tmp / "ports";
  const pid_t coordinator = testing::SpawnLogged(
      {"/usr/bin/timeout", "-k", "5", "200", SHOAL_BINARY, "coordinator", "--swarm", "--config",
       std::string(SHOAL_SOURCE_DIR) + "/configs/tiny.toml", "--stages", "1", "--listen",
       "127.0.0.1:0", "--http", "127.0.0.1:0", "--port-file", ports, "--token-file",
       tmp / "token", "--heartbeat-s", "0.25", "--set", "train.steps=5"},
      tmp / "coordinator.log");
  int grpc = 0, http = 0;
  ASSERT_TRUE(WaitUntil(
      [&] {
        const nlohmann::json j = nlohmann::json::parse(ReadTextFile(ports), nullptr, false);
        if (!j.is_object()) return false;
        grpc = static_cast<int>(testing::JsonNumber(j["grpc"]));
        http = static_cast<int>(testing::JsonNumber(j["http"]));
        return grpc > 0;
      },
      std::chrono::seconds(30)))
      << ReadTextFile(tmp / "coordinator.log");
  auto status = [&] {
    testing::HttpResponse r = testing::HttpGet("127.0.0.1", http, "/api/status", 5);
    return r.status == 200 ? nlohmann::json::parse(r.body, nullptr, false) : nlohmann::json();
  };
  const std::string join = "127.0.0.1:" + std::to_string(grpc);
  // A first peer holds the stage, so the spot one can leave at once when told.
  const pid_t keeper = testing::SpawnLogged(
      {SHOAL_BINARY, "worker", "--join", join, "--token-file", tmp / "token", "--name", "keeper"},
      tmp / "keeper.log");

  FakeMetadata md;
  std::map<std::string, std::string> env = EnvFile(DeployFile("worker.env.example"));
  env["SHOAL_COORDINATOR"] = join;
  env["SHOAL_TOKEN_FILE"] = tmp / "token";
  env["SHOAL_GRACE_S"] = "10";
  env["SHOAL_WORKER_FLAGS"] = "--preemption-url " +
                              md.Url("/computeMetadata/v1/instance/preempted") +
                              " --preemption-header Metadata-Flavor:Google "
                              "--preemption-poll-s 0.2 --name spot";
  const std::string exec = EnvFile(DeployFile("shoal-worker.service")).at("ExecStart");
  std::vector<std::string> argv = Expand(exec, env);
  ASSERT_EQ(argv[0], "/usr/local/bin/shoal");
  argv[0] = SHOAL_BINARY;
  const pid_t spot = testing::SpawnLogged(argv, tmp / "spot.log");

  auto peer_state = [&](const std::string& id) {
    const nlohmann::json s = status();
    if (!s.is_object() || !s.contains("swarm")) return std::string();
    for (const nlohmann::json& st : s["swarm"].value("stages", nlohmann::json::array())) {
      for (const nlohmann::json& p : st.value("peers", nlohmann::json::array())) {
        if (p.value("id", "") == id) return p.value("state", std::string("?"));
      }
    }
    return std::string();
  };
  EXPECT_TRUE(WaitUntil([&] { return Contains(ReadTextFile(tmp / "spot.log"), "synced state"); },
                        std::chrono::seconds(60)))
      << ReadTextFile(tmp / "spot.log") << ReadTextFile(tmp / "coordinator.log");
  EXPECT_FALSE(peer_state("spot").empty());
  const int polls_before = md.polls();
  EXPECT_TRUE(WaitUntil([&] { return md.polls() > polls_before + 2; }, std::chrono::seconds(10)));
  md.Preempt();
  const auto noticed = std::chrono::steady_clock::now();
  int wstatus = 0;
  const bool exited = WaitUntil([&] { return ::waitpid(spot, &wstatus, WNOHANG) == spot; },
                                std::chrono::seconds(30));
  if (!exited) testing::TerminateProcess(spot, std::chrono::seconds(5));
  const double took =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - noticed).count();
  const std::string log = ReadTextFile(tmp / "spot.log");
  ASSERT_TRUE(exited) << log;
  EXPECT_TRUE(WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0) << log;
  EXPECT_LT(took, 10 + 5) << log;
  EXPECT_TRUE(Contains(log, "preemption notice from")) << log;
  EXPECT_TRUE(WaitUntil([&] { return peer_state("spot").empty(); }, std::chrono::seconds(10)));
  EXPECT_EQ(peer_state("keeper"), "SERVING");
  testing::TerminateProcess(keeper, std::chrono::seconds(10));
  testing::TerminateProcess(coordinator, std::chrono::seconds(10));
}

}  // namespace
}  // namespace shoal
