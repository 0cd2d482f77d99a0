// `shoal coordinator` (the gRPC service and its HTTP status port), `shoal status` (the cluster
// as a table or JSON) and `shoal bench coordinator` (solve times and heartbeats per second on one
// core). The coordinator and the status client link the scheduler and the gRPC client only; the
// binary they live in carries LibTorch, but nothing here calls it.
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>
#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "comm/coordinator_client.h"
#include "common/file_util.h"
#include "common/logging.h"
#include "launch/subcommands.h"
#include "proto/coordinator.grpc.pb.h"
#include "scheduler/coordinator_service.h"
#include "scheduler/http_status.h"
#include "scheduler/layout_solver.h"
#include "scheduler/simulator.h"
#include "scheduler/status_table.h"
#include "scheduler/validate.h"

namespace shoal::launch {
namespace {

// 2 for what the user can fix (flags, files), 1 for anything else.
int Fail(const char* who, const absl::Status& status) {
  std::fprintf(stderr, "shoal %s: error: %s\n", who, std::string(status.message()).c_str());
  const bool user_error = status.code() == absl::StatusCode::kInvalidArgument ||
                          status.code() == absl::StatusCode::kNotFound;
  return user_error ? 2 : 1;
}

int ParseFailed(CLI::App& app, const CLI::ParseError& e) { return app.exit(e) == 0 ? 0 : 2; }

// "HOST" of HOST:PORT, to print the address a client should use.
std::string HostOf(const std::string& listen) {
  const size_t colon = listen.rfind(':');
  return colon == std::string::npos ? listen : listen.substr(0, colon);
}

absl::Status CheckSeconds(double v, double max, const char* flag) {
  if (!std::isfinite(v) || v <= 0 || v > max) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, " must be in (0, ", max, "] seconds, got ", v));
  }
  return absl::OkStatus();
}

}  // namespace

int CoordinatorMain(int argc, char** argv) {
  CLI::App app{"Run the coordinator: workers join it, heartbeat to it and receive their part of "
               "the layout it solves (gRPC), with an optional HTTP status port and dashboard"};
  app.name("shoal coordinator");
  std::string listen, token_file, tls_cert, tls_key, http, port_file;
  double lease_s = 10, heartbeat_s = 2, relayout_gain = 0.05;
  int history_points = 2000;
  int max_message_mb = 4;
  app.add_option("--listen", listen, "gRPC address HOST:PORT (port 0: a free one)")->required();
  app.add_option("--token-file", token_file,
                 "File whose first line is the job's token; every call must carry it");
  app.add_option("--tls-cert", tls_cert, "PEM certificate chain (with --tls-key: TLS only)");
  app.add_option("--tls-key", tls_key, "PEM private key of --tls-cert");
  app.add_option("--http", http, "HTTP status address HOST:PORT: /metrics, /api/status, /");
  app.add_option("--lease-s", lease_s, "A worker is dead this long after its last heartbeat")
      ->capture_default_str();
  app.add_option("--heartbeat-s", heartbeat_s, "How often workers send heartbeats")
      ->capture_default_str();
  app.add_option("--history", history_points, "Loss/throughput points kept for the dashboard")
      ->capture_default_str();
  app.add_option("--max-message-mb", max_message_mb, "Largest request or response, MiB")
      ->capture_default_str();
  app.add_option("--relayout-gain", relayout_gain,
                 "While the current layout still runs, a new one replaces it only if it predicts "
                 "at least this fraction more tokens/s (a change costs a restart)")
      ->capture_default_str();
  app.add_option("--port-file", port_file,
                 "Write {\"grpc\": P, \"http\": Q} here once listening (atomically; http 0: none)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return ParseFailed(app, e);
  }
  const char* who = "coordinator";
  if (absl::Status s = CheckSeconds(lease_s, 86400, "--lease-s"); !s.ok()) return Fail(who, s);
  if (absl::Status s = CheckSeconds(heartbeat_s, 86400, "--heartbeat-s"); !s.ok()) {
    return Fail(who, s);
  }
  if (heartbeat_s > lease_s) {
    return Fail(who, absl::InvalidArgumentError(absl::StrCat(
                         "--heartbeat-s (", heartbeat_s, ") must not exceed --lease-s (",
                         lease_s, "): every lease would run out between heartbeats")));
  }
  if (!(relayout_gain >= 0 && relayout_gain <= 10)) {
    return Fail(who, absl::InvalidArgumentError(absl::StrCat(
                         "--relayout-gain must be in [0, 10], got ", relayout_gain)));
  }
  if (history_points < 1 || history_points > 1000000) {
    return Fail(who, absl::InvalidArgumentError(absl::StrCat(
                         "--history must be in [1, 1000000], got ", history_points)));
  }
  if (max_message_mb < 1 || max_message_mb > 1024) {
    return Fail(who, absl::InvalidArgumentError(absl::StrCat(
                         "--max-message-mb must be in [1, 1024], got ", max_message_mb)));
  }

  scheduler::CoordinatorServerOptions options;
  options.listen = listen;
  options.tls_cert_file = tls_cert;
  options.tls_key_file = tls_key;
  options.max_message_bytes = max_message_mb << 20;
  options.core.lease_ms = static_cast<int64_t>(std::llround(lease_s * 1000));
  options.core.heartbeat_interval_ms =
      std::max<int64_t>(1, static_cast<int64_t>(std::llround(heartbeat_s * 1000)));
  options.core.history_points = history_points;
  options.core.log_events = true;
  options.core.relayout_min_gain = relayout_gain;
  if (!token_file.empty()) {
    absl::StatusOr<std::string> token = scheduler::ReadTokenFile(token_file);
    if (!token.ok()) return Fail(who, token.status());
    options.token = *token;
  }

  // SIGINT/SIGTERM are taken by sigwait below; blocked before any thread starts, so gRPC's and
  // httplib's threads inherit the mask and never run the default handler.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  auto server = scheduler::CoordinatorServer::Start(options);
  if (!server.ok()) return Fail(who, server.status());
  scheduler::CoordinatorCore* core = &(*server)->core();
  std::unique_ptr<scheduler::HttpStatusServer> http_server;
  if (!http.empty()) {
    auto started = scheduler::HttpStatusServer::Start(http, [core] { return core->Status(); });
    if (!started.ok()) {
      (*server)->Shutdown();
      return Fail(who, started.status());
    }
    http_server = std::move(*started);
  }
  const int grpc_port = (*server)->port();
  const int http_port = http_server ? http_server->port() : 0;
  std::string line = absl::StrCat("coordinator: listening on ", HostOf(listen), ":", grpc_port,
                                  " (grpc", tls_cert.empty() ? "" : ", tls", ")");
  if (http_server) absl::StrAppend(&line, " http://", HostOf(http), ":", http_port);
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
  if (!port_file.empty()) {
    const nlohmann::json ports = {{"grpc", grpc_port}, {"http", http_port}};
    if (absl::Status s = WriteFileAtomic(port_file, ports.dump() + "\n"); !s.ok()) {
      if (http_server) http_server->Stop();
      (*server)->Shutdown();
      return Fail(who, absl::InvalidArgumentError(
                           absl::StrCat("--port-file ", port_file, ": ", s.message())));
    }
  }

  int sig = 0;
  sigwait(&stop_signals, &sig);
  SHOAL_LOG(Info) << "coordinator: stopping (" << strsignal(sig) << ")";
  if (http_server) http_server->Stop();
  (*server)->Shutdown();
  return 0;
}

int StatusMain(int argc, char** argv) {
  CLI::App app{"Show the cluster as the coordinator sees it: health, step, loss, throughput, "
               "the layout and one row per worker"};
  app.name("shoal status");
  comm::CoordinatorClientOptions options;
  std::string token_file;
  bool json = false;
  double timeout_s = 10;
  app.add_option("--coordinator", options.address, "The coordinator's gRPC address HOST:PORT")
      ->required();
  app.add_flag("--json", json, "Print the status as JSON (the proto's field names)");
  app.add_option("--token-file", token_file, "File whose first line is the job's token");
  app.add_option("--tls-ca", options.tls_ca_file, "PEM roots to verify the coordinator (TLS)");
  app.add_option("--timeout-s", timeout_s, "Give up after this many seconds")
      ->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return ParseFailed(app, e);
  }
  const char* who = "status";
  if (absl::Status s = CheckSeconds(timeout_s, 3600, "--timeout-s"); !s.ok()) return Fail(who, s);
  options.timeout = absl::Seconds(timeout_s);
  if (!token_file.empty()) {
    absl::StatusOr<std::string> token = scheduler::ReadTokenFile(token_file);
    if (!token.ok()) return Fail(who, token.status());
    options.token = *token;
  }
  auto client = comm::CoordinatorClient::Connect(options);
  if (!client.ok()) return Fail(who, client.status());
  absl::StatusOr<v1::ClusterStatus> status = (*client)->GetStatus();
  if (!status.ok()) {
    // ToString() keeps the code's name (UNAVAILABLE, UNAUTHENTICATED), which says what to fix.
    std::fprintf(stderr, "shoal status: error: no status from the coordinator at %s: %s\n",
                 options.address.c_str(), status.status().ToString().c_str());
    return 1;
  }
  if (json) {
    std::string text;
    google::protobuf::util::JsonPrintOptions jo;
    jo.preserve_proto_field_names = true;
    jo.always_print_primitive_fields = true;
    auto s = google::protobuf::util::MessageToJsonString(*status, &text, jo);
    if (!s.ok()) {
      std::fprintf(stderr, "shoal status: error: cannot print the status as JSON: %s\n",
                   s.ToString().c_str());
      return 1;
    }
    std::cout << text << std::endl;
  } else {
    std::cout << scheduler::FormatStatusTable(*status) << std::flush;
  }
  return 0;
}

namespace {

// User and system CPU seconds a process has used so far (/proc/<pid>/stat fields 14 and 15).
double ProcessCpuSeconds(pid_t pid) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/stat"));
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  // The command name (field 2) may hold spaces; fields are counted after its closing ')'.
  const size_t paren = stat.rfind(')');
  if (paren == std::string::npos) return 0;
  std::istringstream rest(stat.substr(paren + 2));
  std::string field;
  double utime = 0, stime = 0;
  for (int i = 3; i <= 15 && (rest >> field); ++i) {
    if (i == 14) utime = std::atof(field.c_str());
    if (i == 15) stime = std::atof(field.c_str());
  }
  return (utime + stime) / static_cast<double>(::sysconf(_SC_CLK_TCK));
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// The model the solve benchmark lays out: GPT-2 XL's shape (1.5 B parameters) with fp32 AdamW,
// big enough that pipelines and memory tiers matter on the synthetic cluster's devices.
v1::JobSpec BenchJob(int global_batch, int expected_workers) {
  v1::JobSpec job;
  job.set_name("bench");
  v1::ModelSpec* m = job.mutable_model();
  m->set_n_layer(48);
  m->set_n_head(25);
  m->set_n_embd(1600);
  m->set_block_size(1024);
  m->set_vocab_size(50304);
  m->set_param_bytes(4);
  m->set_grad_bytes(4);
  m->set_optimizer_bytes(8);
  job.set_global_batch(global_batch);
  job.set_expected_workers(expected_workers);
  return job;
}

// A `shoal coordinator` child pinned to one core, stopped (SIGTERM) when this goes out of scope.
class CoordinatorChild {
 public:
  ~CoordinatorChild() {
    if (pid_ > 0) {
      ::kill(pid_, SIGTERM);
      int status = 0;
      ::waitpid(pid_, &status, 0);
    }
    if (!dir_.empty()) (void)RemoveAll(dir_);
  }

  absl::Status Start(int core) {
    char tmpl[] = "/tmp/shoal_bench_coord_XXXXXX";
    if (::mkdtemp(tmpl) == nullptr) return absl::InternalError("mkdtemp failed");
    dir_ = tmpl;
    const std::string port_file = dir_ + "/ports.json";
    const std::string log_file = dir_ + "/coordinator.log";
    const std::string self = SelfExecutablePath();
    pid_ = ::fork();
    if (pid_ < 0) return absl::InternalError("fork failed");
    if (pid_ == 0) {
      cpu_set_t set;
      CPU_ZERO(&set);
      CPU_SET(core, &set);
      ::sched_setaffinity(0, sizeof(set), &set);
      const int fd = ::open(log_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (fd >= 0) {
        ::dup2(fd, 1);
        ::dup2(fd, 2);
      }
      // Leases far longer than the run: no worker may expire while the bench hammers others.
      ::execl(self.c_str(), "shoal", "coordinator", "--listen", "127.0.0.1:0", "--port-file",
              port_file.c_str(), "--lease-s", "3600", "--heartbeat-s", "60",
              static_cast<char*>(nullptr));
      ::_exit(127);
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (std::chrono::steady_clock::now() < deadline) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return absl::InternalError(absl::StrCat("the coordinator child exited at start; see ",
                                                log_file));
      }
      absl::StatusOr<std::string> ports = ReadFileToString(port_file);
      if (ports.ok()) {
        auto j = nlohmann::json::parse(*ports, nullptr, /*allow_exceptions=*/false);
        if (j.is_object() && j.contains("grpc")) {
          port_ = j["grpc"].get<int>();
          return absl::OkStatus();
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return absl::DeadlineExceededError("the coordinator child did not listen within 60 s");
  }

  pid_t pid() const { return pid_; }
  int port() const { return port_; }

 private:
  pid_t pid_ = -1;
  int port_ = 0;
  std::string dir_;
};

// Heartbeats from `workers` joined workers, `in_flight` calls outstanding at any time over a few
// channels, for `seconds` after a one-second warm-up. Returns (heartbeats/s, coordinator CPU
// seconds over the window, errors).
struct HeartbeatResult {
  double per_s = 0;
  double cpu_s = 0;
  int64_t ok = 0;
  int64_t errors = 0;
  double seconds = 0;
};

absl::StatusOr<HeartbeatResult> HammerHeartbeats(const CoordinatorChild& child, int workers,
                                                 int in_flight, double seconds) {
  const std::string address = absl::StrCat("127.0.0.1:", child.port());
  comm::CoordinatorClientOptions co;
  co.address = address;
  auto client = comm::CoordinatorClient::Connect(co);
  if (!client.ok()) return client.status();
  const std::vector<scheduler::SolverDevice> devices = scheduler::SyntheticCluster(workers, 11);
  const v1::JobSpec job = BenchJob(512, workers);
  std::vector<v1::HeartbeatRequest> beats;
  for (int i = 0; i < workers; ++i) {
    v1::JoinRequest join;
    join.set_protocol_version(scheduler::kProtocolVersion);
    *join.mutable_device() = devices[i].profile;
    *join.mutable_job() = job;
    join.set_mesh_rank(-1);
    join.set_name(absl::StrFormat("bench-%05d", i));
    absl::StatusOr<v1::JoinResponse> r = (*client)->Join(join);
    if (!r.ok()) return r.status();
    v1::HeartbeatRequest hb;
    hb.set_worker_id(r->worker_id());
    hb.mutable_stats()->set_step(100);
    hb.mutable_stats()->set_loss(3.25);
    hb.mutable_stats()->set_tokens_per_s(12345);
    hb.mutable_stats()->set_step_time_s(1.5);
    hb.mutable_stats()->set_lr(3e-4);
    hb.mutable_stats()->mutable_memory_used()->set_host_bytes(int64_t{8} << 30);
    beats.push_back(std::move(hb));
  }
  std::fprintf(stderr, "bench coordinator: %d workers joined; heartbeats for %.1f s (+1 s warm-up)\n",
               workers, seconds);

  // Several channels, so the client is not limited by one HTTP/2 connection's ordering.
  constexpr int kChannels = 4;
  std::vector<std::unique_ptr<v1::Coordinator::Stub>> stubs;
  for (int c = 0; c < kChannels; ++c) {
    grpc::ChannelArguments args;
    args.SetInt("grpc.channel_id", c);  // distinct arguments: distinct connections
    stubs.push_back(v1::Coordinator::NewStub(
        grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args)));
  }
  struct Call {
    grpc::ClientContext ctx;
    v1::HeartbeatResponse response;
    grpc::Status status;
    std::unique_ptr<grpc::ClientAsyncResponseReader<v1::HeartbeatResponse>> rpc;
  };
  grpc::CompletionQueue cq;
  int64_t issued = 0;
  auto start_call = [&] {
    auto* call = new Call;
    call->ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    call->rpc = stubs[issued % kChannels]->AsyncHeartbeat(&call->ctx, beats[issued % workers], &cq);
    call->rpc->Finish(&call->response, &call->status, call);
    ++issued;
  };
  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  const auto measure_from = t0 + std::chrono::seconds(1);
  const auto end = measure_from + std::chrono::duration_cast<Clock::duration>(
                                      std::chrono::duration<double>(seconds));
  for (int i = 0; i < in_flight; ++i) start_call();
  int outstanding = in_flight;
  bool measuring = false;
  double cpu0 = 0;
  Clock::time_point window_start;
  HeartbeatResult result;
  int64_t ok_before = 0;
  int64_t ok = 0, errors = 0;
  std::string first_error;
  while (outstanding > 0) {
    void* tag = nullptr;
    bool got = false;
    if (!cq.Next(&tag, &got)) break;
    auto* call = static_cast<Call*>(tag);
    if (got && call->status.ok()) {
      ++ok;
    } else {
      ++errors;
      if (first_error.empty()) first_error = call->status.error_message();
    }
    delete call;
    --outstanding;
    const auto now = Clock::now();
    if (!measuring && now >= measure_from) {
      measuring = true;
      window_start = now;
      cpu0 = ProcessCpuSeconds(child.pid());
      ok_before = ok;
    }
    if (now < end) {
      start_call();
      ++outstanding;
    } else if (measuring && result.seconds == 0) {
      result.seconds = std::chrono::duration<double>(now - window_start).count();
      result.cpu_s = ProcessCpuSeconds(child.pid()) - cpu0;
      result.ok = ok - ok_before;
    }
  }
  cq.Shutdown();
  void* tag;
  bool got;
  while (cq.Next(&tag, &got)) delete static_cast<Call*>(tag);
  result.errors = errors;
  if (result.seconds <= 0) return absl::InternalError("the heartbeat window did not complete");
  if (errors > 0) {
    std::fprintf(stderr, "bench coordinator: %lld heartbeats failed, first: %s\n",
                 static_cast<long long>(errors), first_error.c_str());
  }
  result.per_s = result.ok / result.seconds;
  return result;
}

}  // namespace

int BenchCoordinatorMain(int argc, char** argv) {
  CLI::App app{"Coordinator figures: layout solve time for 16 .. 4096 synthetic devices and "
               "heartbeats handled per second by a coordinator pinned to one core"};
  app.name("shoal bench coordinator");
  int max_devices = 4096;
  double heartbeat_seconds = 5;
  int workers = 256;
  int in_flight = 256;
  app.add_option("--max-devices", max_devices, "Largest cluster to solve (16, 64, ... up to it)")
      ->capture_default_str();
  app.add_option("--heartbeat-seconds", heartbeat_seconds,
                 "Measured heartbeat window, seconds (0: skip the heartbeat part)")
      ->capture_default_str();
  app.add_option("--workers", workers, "Virtual workers that join before the heartbeats")
      ->capture_default_str();
  app.add_option("--in-flight", in_flight, "Heartbeat calls outstanding at a time")
      ->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return ParseFailed(app, e);
  }
  const char* who = "bench coordinator";
  if (max_devices < 16 || max_devices > 65536) {
    return Fail(who, absl::InvalidArgumentError(absl::StrCat(
                         "--max-devices must be in [16, 65536], got ", max_devices)));
  }
  if (!std::isfinite(heartbeat_seconds) || heartbeat_seconds < 0 || heartbeat_seconds > 3600) {
    return Fail(who, absl::InvalidArgumentError(absl::StrCat(
                         "--heartbeat-seconds must be in [0, 3600], got ", heartbeat_seconds)));
  }
  if (workers < 1 || workers > 100000) {
    return Fail(who, absl::InvalidArgumentError(
                         absl::StrCat("--workers must be in [1, 100000], got ", workers)));
  }
  if (in_flight < 1 || in_flight > 100000) {
    return Fail(who, absl::InvalidArgumentError(
                         absl::StrCat("--in-flight must be in [1, 100000], got ", in_flight)));
  }

  nlohmann::json out;
  out["solve"] = nlohmann::json::array();
  for (int n = 16; n <= max_devices; n *= 4) {
    const std::vector<scheduler::SolverDevice> devices = scheduler::SyntheticCluster(n, 1);
    const v1::JobSpec job = BenchJob(std::max(512, n / 2), n);
    const int runs = n <= 256 ? 5 : (n <= 1024 ? 3 : 1);
    std::vector<double> times;
    absl::StatusOr<v1::Layout> layout;
    for (int r = 0; r < runs; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      layout = scheduler::SolveLayout(devices, job);
      times.push_back(
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      if (!layout.ok()) return Fail(who, layout.status());
    }
    const double median = Median(times);
    std::fprintf(stderr, "bench coordinator: solve %5d devices: %.4f s (median of %d): %s\n", n,
                 median, runs, layout->summary().c_str());
    out["solve"].push_back({{"devices", n},
                            {"seconds", median},
                            {"runs", runs},
                            {"tp", layout->tp()},
                            {"pp", layout->pp()},
                            {"dp", layout->dp()}});
  }

  if (heartbeat_seconds > 0) {
    const int cpus = static_cast<int>(::sysconf(_SC_NPROCESSORS_ONLN));
    const int core = std::max(0, cpus - 1);
    CoordinatorChild child;
    if (absl::Status s = child.Start(core); !s.ok()) return Fail(who, s);
    // The load generator keeps off the coordinator's core where there is another.
    if (cpus > 1) {
      cpu_set_t set;
      CPU_ZERO(&set);
      for (int c = 0; c < cpus; ++c) {
        if (c != core) CPU_SET(c, &set);
      }
      ::sched_setaffinity(0, sizeof(set), &set);
    }
    absl::StatusOr<HeartbeatResult> hb =
        HammerHeartbeats(child, workers, in_flight, heartbeat_seconds);
    if (!hb.ok()) return Fail(who, hb.status());
    std::fprintf(stderr,
                 "bench coordinator: %.0f heartbeats/s over %.2f s; coordinator (pinned to core "
                 "%d) used %.2f CPU-s: %.0f heartbeats per CPU-second\n",
                 hb->per_s, hb->seconds, core, hb->cpu_s,
                 hb->cpu_s > 0 ? hb->ok / hb->cpu_s : 0.0);
    out["heartbeats_per_s"] = hb->per_s;
    out["heartbeat_window_s"] = hb->seconds;
    out["coordinator_cpu_s"] = hb->cpu_s;
    out["heartbeats_per_cpu_s"] = hb->cpu_s > 0 ? hb->ok / hb->cpu_s : 0.0;
    out["heartbeat_errors"] = hb->errors;
    out["workers"] = workers;
    out["in_flight"] = in_flight;
    out["coordinator_core"] = core;
    out["machine_cores"] = cpus;
  } else {
    out["heartbeats_per_s"] = nullptr;
  }
  std::cout << out.dump() << std::endl;
  return 0;
}

}  // namespace shoal::launch
