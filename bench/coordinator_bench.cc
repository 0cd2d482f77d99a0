// `shoal bench coordinator`: what one coordinator process can carry. (1) The layout solver's
// time on synthetic clusters of 16 .. 4096 devices (the same solver the live coordinator runs);
// (2) heartbeats per second handled by a real `shoal coordinator` child pinned to one core, with
// the load generator on the other cores, and the CPU seconds the child used for them.
#include <fcntl.h>
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
#include <grpcpp/grpcpp.h>
#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bench/bench_runs.h"
#include "bench/benches.h"
#include "comm/coordinator_client.h"
#include "common/file_util.h"
#include "common/status.h"
#include "proto/coordinator.grpc.pb.h"
#include "scheduler/layout_solver.h"
#include "scheduler/simulator.h"

namespace shoal::bench {
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

// A `shoal coordinator` child pinned to one core, stopped when this goes out of scope.
class CoordinatorChild {
 public:
  ~CoordinatorChild() {
    process_.Stop();
    if (!dir_.empty()) (void)RemoveAll(dir_);
  }

  absl::Status Start(int core) {
    char tmpl[] = "/tmp/shoal_bench_coord_XXXXXX";
    if (::mkdtemp(tmpl) == nullptr) return absl::InternalError("mkdtemp failed");
    dir_ = tmpl;
    const std::string port_file = dir_ + "/ports.json";
    // Leases far longer than the run: no worker may expire while the bench hammers others.
    SHOAL_RETURN_IF_ERROR(process_.Start({"coordinator", "--listen", "127.0.0.1:0",
                                          "--port-file", port_file, "--lease-s", "3600",
                                          "--heartbeat-s", "60"},
                                         dir_ + "/coordinator.log", core));
    SHOAL_ASSIGN_OR_RETURN(const nlohmann::json ports,
                           WaitForPortFile(process_, port_file, absl::Seconds(60)));
    port_ = ports["grpc"].get<int>();
    return absl::OkStatus();
  }

  pid_t pid() const { return process_.pid(); }
  int port() const { return port_; }

 private:
  ChildProcess process_;
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
    join.set_protocol_version(v1::PROTOCOL_VERSION_CURRENT);
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

int CoordinatorBenchMain(int argc, char** argv, const BenchHost& host) {
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
    return app.exit(e) == 0 ? 0 : 2;
  }
  auto fail = [&host](const absl::Status& s) {
    std::fprintf(stderr, "shoal bench coordinator: error: %s\n", std::string(s.message()).c_str());
    return host.exit_code(s);
  };
  if (max_devices < 16 || max_devices > 65536) {
    return fail(absl::InvalidArgumentError(absl::StrCat(
                         "--max-devices must be in [16, 65536], got ", max_devices)));
  }
  if (!std::isfinite(heartbeat_seconds) || heartbeat_seconds < 0 || heartbeat_seconds > 3600) {
    return fail(absl::InvalidArgumentError(absl::StrCat(
                         "--heartbeat-seconds must be in [0, 3600], got ", heartbeat_seconds)));
  }
  if (workers < 1 || workers > 100000) {
    return fail(absl::InvalidArgumentError(
                         absl::StrCat("--workers must be in [1, 100000], got ", workers)));
  }
  if (in_flight < 1 || in_flight > 100000) {
    return fail(absl::InvalidArgumentError(
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
      if (!layout.ok()) return fail(layout.status());
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
    if (absl::Status s = child.Start(core); !s.ok()) return fail(s);
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
    if (!hb.ok()) return fail(hb.status());
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

}  // namespace shoal::bench
