// `shoal coordinator` (the gRPC service and its HTTP status port; with --swarm, a swarm's
// coordinator over the job's config) and `shoal status` (the cluster as a table or JSON). They
// link the scheduler, the gRPC client and the config reader; the binary they live in carries
// LibTorch, but nothing here calls it. (`shoal bench coordinator` is in bench/.)
#include <pthread.h>
#include <signal.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <google/protobuf/util/json_util.h>
#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "comm/coordinator_client.h"
#include "common/auth_token.h"
#include "common/file_util.h"
#include "common/logging.h"
#include "common/net_util.h"
#include "common/sha256.h"
#include "launch/subcommands.h"
#include "parallel/layout.h"
#include "runtime/checkpoint.h"
#include "runtime/config.h"
#include "runtime/lr_schedule.h"
#include "scheduler/swarm_policy.h"
#include "scheduler/coordinator_service.h"
#include "scheduler/http_status.h"
#include "scheduler/status_table.h"

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

// The swarm's coordinator for `config` in `stages` stages. kInvalidArgument naming what swarm
// mode cannot run.
absl::StatusOr<std::shared_ptr<scheduler::SwarmCoordinator>> MakeSwarm(
    const runtime::Config& config, int stages, const std::string& codec, int64_t lease_ms,
    int64_t heartbeat_ms, const std::string& resume, double rebalance_s) {
  const runtime::ModelConfig& m = config.model;
  auto refuse = [](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("--swarm: ", what));
  };
  if (stages < 1 || stages > m.n_layer) {
    return refuse(absl::StrCat("--stages ", stages, " is outside [1, model.n_layer = ", m.n_layer,
                               "]"));
  }
  if (config.parallel.tp > 1) {
    return refuse(absl::StrCat("parallel.tp = ", config.parallel.tp,
                               ": a swarm's stages are not tensor-parallel (use 1)"));
  }
  if (config.parallel.zero != 0) {
    return refuse("parallel.zero = 1: a swarm peer holds its stage's whole optimizer state");
  }
  if (config.parallel.schedule == "interleaved" || config.parallel.virtual_stages > 1) {
    return refuse("parallel.schedule = interleaved: a swarm peer serves one contiguous stage");
  }
  if (config.train.dtype != "fp32") {
    return refuse(absl::StrCat("train.dtype = ", config.train.dtype,
                               ": swarm peers exchange float32 activations (use fp32)"));
  }
  if (config.memory.activation_budget.set()) {
    return refuse(absl::StrCat("memory.activation_budget = ", config.memory.activation_budget.text,
                               ": swarm peers keep their activations"));
  }
  if (config.memory.host_budget.set() || config.memory.disk_budget.set() ||
      !config.memory.disk_path.empty()) {
    return refuse("memory.host_budget / disk_budget / disk_path (paged states): a swarm peer "
                  "keeps its stage in RAM");
  }
  if (codec != "fp32" && codec != "bf16" && codec != "int8") {
    return refuse(absl::StrCat("--codec ", codec, " is not fp32, bf16 or int8"));
  }
  absl::StatusOr<std::vector<int>> blocks = parallel::BlocksPerStage(
      static_cast<int>(config.parallel.stages.size()) == stages ? config.parallel.stages
                                                                : std::vector<int>{},
      m.n_layer, stages);
  if (!blocks.ok()) return blocks.status();
  scheduler::SwarmCoordinatorOptions o;
  o.rebalance_s = rebalance_s;
  o.job.stages = stages;
  o.job.micro_batches = config.train.grad_accum;
  o.job.grad_clip = config.optim.grad_clip;
  // The stage rounds (swarm.sync): fp32 sums for AdamW, DeMo payloads, or decided per job from
  // the first worker's measured link. optim.name = "demo" is DeMo whatever the links.
  o.sync = config.optim.name == "demo" ? "demo" : config.swarm.sync;
  o.slow_link_gbps = config.swarm.slow_link_mbit / 8e3;
  runtime::Config fp32 = config, demo = config;
  fp32.optim.name = "adamw";
  demo.optim.name = "demo";
  o.info.set_config_toml(fp32.ToToml());
  if (o.sync != "fp32") {
    if (absl::Status s = runtime::ValidateConfig(demo); !s.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("swarm.sync = ", config.swarm.sync, " may run DeMo: ", s.message()));
    }
    o.demo_config_toml = demo.ToToml();
  }
  o.info.set_stages(stages);
  o.info.set_micro_batches(config.train.grad_accum);
  o.info.set_total_steps(config.train.steps);
  o.info.set_codec(codec);
  for (int s = 0; s < stages; ++s) {
    const auto [first, end] = parallel::StageRange(*blocks, s);
    o.info.add_first_layer(first);
    o.info.add_end_layer(end);
    absl::StatusOr<int64_t> bytes =
        scheduler::SwarmStageBytesInSplit(ShapeOf(m), *blocks, s, /*activation_bytes=*/0);
    if (!bytes.ok()) return bytes.status();
    o.job.stage_bytes.push_back(*bytes);
  }
  // The job's tokens, when the coordinator can see them: every trainer must read the same.
  if (!config.data.dir.empty() && PathExists(config.data.dir + "/train.bin")) {
    absl::StatusOr<std::string> sha = Sha256File(config.data.dir + "/train.bin");
    if (!sha.ok()) return sha.status();
    o.info.set_train_sha256(*sha);
  }
  const runtime::OptimConfig optim = config.optim;
  const int64_t total = config.train.steps;
  o.state.learning_rate = [optim, total](int64_t step) {
    return step < total ? runtime::LearningRateAt(step, optim, total) : std::nan("");
  };
  if (!resume.empty()) {
    // The job continues a checkpoint (a swarm's, or one process's of the same model): the first
    // peer of each stage loads its part of it, so peers must be able to read the folder.
    std::string dir = resume;
    if (!PathExists(dir + "/manifest.json")) {
      runtime::CheckpointStore store(dir, /*keep=*/0);
      absl::StatusOr<std::vector<std::string>> steps = store.ListStepDirs();
      if (!steps.ok()) return steps.status();
      if (steps->empty()) {
        return absl::NotFoundError(absl::StrCat(
            "--resume ", resume, ": neither a checkpoint (no manifest.json) nor a folder of "
            "step_XXXXXXXX checkpoints"));
      }
      dir = steps->back();
    }
    absl::StatusOr<runtime::CheckpointState> ck = runtime::CheckpointStore::Load(dir);
    if (!ck.ok()) {
      return absl::Status(ck.status().code(),
                          absl::StrCat("--resume ", dir, ": ", ck.status().message()));
    }
    // The checkpoint's rounds go on: "auto" takes its optimizer; "fp32" or "demo" must match it.
    absl::StatusOr<runtime::Config> saved = runtime::ParseConfig(ck->config_toml, dir);
    if (!saved.ok()) {
      return absl::DataLossError(absl::StrCat("--resume ", dir, ": its config: ",
                                              saved.status().message()));
    }
    runtime::Config resumed = config;
    if (o.sync == "auto") {
      o.sync = saved->optim.name == "demo" ? "demo" : "fp32";
      resumed.optim.name = saved->optim.name;
    } else {
      resumed.optim.name = o.sync == "demo" ? "demo" : "adamw";
    }
    if (absl::Status s = runtime::CheckResumable(*ck, resumed, dir); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("--resume: ", s.message()));
    }
    if (ck->step >= config.train.steps) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--resume ", dir, " is at step ", ck->step, ", train.steps is ", config.train.steps,
          ": nothing left to train (raise train.steps)"));
    }
    std::error_code error;
    const std::filesystem::path absolute = std::filesystem::absolute(dir, error);
    o.job.checkpoint_step = ck->step;
    o.checkpoint_path = error ? dir : absolute.string();
  }
  o.lease_ms = lease_ms;
  o.heartbeat_interval_ms = heartbeat_ms;
  o.log_events = true;
  o.reachable = [](const std::string& address) {
    return CanConnect(address, absl::Seconds(2));
  };
  absl::StatusOr<std::unique_ptr<scheduler::SwarmCoordinator>> swarm =
      scheduler::SwarmCoordinator::Create(std::move(o), nullptr);
  if (!swarm.ok()) return swarm.status();
  return std::shared_ptr<scheduler::SwarmCoordinator>(std::move(*swarm));
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
  bool swarm = false;
  std::string config_path, codec = "fp32";
  std::vector<std::string> overrides;
  int stages = 0;
  app.add_flag("--swarm", swarm,
               "Run a swarm: peers serve stages and trainers drive micro-batches "
               "(`shoal worker --join`), for the job of --config");
  app.add_option("--config", config_path, "--swarm: the job's TOML config");
  app.add_option("--set", overrides, "--swarm: override a config key, section.key=value");
  app.add_option("--stages", stages, "--swarm: pipeline stages, in [1, model.n_layer]");
  app.add_option("--codec", codec, "--swarm: activations on the wire: fp32, bf16 or int8")
      ->capture_default_str();
  double rebalance_s = 60;
  app.add_option("--rebalance-s", rebalance_s,
                 "--swarm: seconds between the rebalancer's checks, which move a peer to the "
                 "bottleneck stage when that pays (0: never)")
      ->capture_default_str();
  std::string resume;
  app.add_option("--resume", resume,
                 "--swarm: start the job from this checkpoint (a step_XXXXXXXX folder, or a "
                 "folder of them: the newest), which every peer must be able to read");
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
  if (!(std::isfinite(rebalance_s) && rebalance_s >= 0 && rebalance_s <= 86400)) {
    return Fail(who, absl::InvalidArgumentError(absl::StrCat(
                         "--rebalance-s must be in [0, 86400] seconds (0: never), got ",
                         rebalance_s)));
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
  if (swarm) {
    if (config_path.empty() || stages == 0) {
      return Fail(who, absl::InvalidArgumentError("--swarm needs --config and --stages"));
    }
    absl::StatusOr<runtime::Config> config = runtime::LoadConfig(config_path, overrides);
    if (!config.ok()) return Fail(who, config.status());
    absl::StatusOr<std::shared_ptr<scheduler::SwarmCoordinator>> made =
        MakeSwarm(*config, stages, codec,
                  static_cast<int64_t>(std::llround(lease_s * 1000)),
                  std::max<int64_t>(1, static_cast<int64_t>(std::llround(heartbeat_s * 1000))),
                  resume, rebalance_s);
    if (!made.ok()) return Fail(who, made.status());
    options.swarm = *std::move(made);
  } else if (!config_path.empty() || stages != 0 || !overrides.empty() || !resume.empty()) {
    return Fail(who, absl::InvalidArgumentError(
                         "--config, --set, --stages and --resume go with --swarm (a mesh job's "
                         "workers bring their own config and checkpoints)"));
  }
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
    absl::StatusOr<std::string> token = ReadTokenFile(token_file);
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
  scheduler::SwarmCoordinator* swarm_core = (*server)->swarm();
  std::unique_ptr<scheduler::HttpStatusServer> http_server;
  if (!http.empty()) {
    auto started = scheduler::HttpStatusServer::Start(http, [core, swarm_core] {
      return swarm_core != nullptr ? swarm_core->Status() : core->Status();
    });
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
  if (swarm) absl::StrAppend(&line, " swarm of ", stages, " stages");
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
    absl::StatusOr<std::string> token = ReadTokenFile(token_file);
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

}  // namespace shoal::launch
