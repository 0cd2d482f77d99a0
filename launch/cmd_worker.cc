// `shoal worker --join HOST:PORT [--trainer]`: join a swarm as a peer or a trainer
// (swarm_worker.h). Flags are checked here; the roles are in swarm_peer_role.cc and
// swarm_trainer_role.cc.
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/auth_token.h"
#include "common/net_util.h"
#include "launch/exit_code.h"
#include "launch/preemption_watch.h"
#include "launch/subcommands.h"
#include "launch/swarm_worker.h"
#include "runtime/profiler.h"

namespace shoal::launch {

int WorkerMain(int argc, char** argv) {
  CLI::App app{"Join a swarm (a coordinator started with --swarm): serve a pipeline stage as a "
               "peer, or with --trainer drive micro-batches from the data"};
  app.name("shoal worker");
  SwarmWorkerOptions o;
  std::string token_file;
  double join_timeout_s = 60;
  app.add_option("--join", o.coordinator, "The swarm coordinator's gRPC address HOST:PORT")
      ->required();
  app.add_option("--token-file", token_file, "File whose first line is the job's token");
  app.add_option("--tls-ca", o.tls_ca_file, "PEM roots to verify the coordinator and the peers");
  app.add_option("--tls-cert", o.tls_cert_file, "A peer's PEM certificate (serves TLS only)");
  app.add_option("--tls-key", o.tls_key_file, "The private key of --tls-cert");
  app.add_option("--name", o.name, "A stable id for this worker (default: the coordinator's)");
  app.add_flag("--trainer", o.trainer, "Join as a trainer: needs the data, no inbound port");
  app.add_option("--listen", o.listen, "A peer's SwarmPeer address HOST:PORT (port 0: a free one)")
      ->capture_default_str();
  app.add_option("--advertise", o.advertise,
                 "The address others dial for this peer, when not --listen's (NAT, 0.0.0.0)");
  app.add_option("--grace-s", o.grace_s, "On SIGTERM, how long a peer stays for its round")
      ->capture_default_str();
  PreemptionWatchOptions watch;
  double poll_s = 5;
  app.add_option("--preemption-url", watch.url,
                 "Poll this instance-metadata URL (http://) and drain at a preemption notice: "
                 "an answer 200 that is not empty or \"false\" (GCP .../instance/preempted, "
                 "AWS .../spot/instance-action)");
  app.add_option("--preemption-header", watch.headers,
                 "A header line for the polls, e.g. \"Metadata-Flavor: Google\" (repeatable)");
  app.add_option("--preemption-poll-s", poll_s, "Seconds between polls")->capture_default_str();
  app.add_option("--catchup-steps", o.catchup_steps,
                 "Steps a peer keeps in its catch-up log for joiners (each one gradient's size)")
      ->capture_default_str();
  app.add_option("--cache-slots", o.cache_slots,
                 "Forwards a peer keeps for their backwards (>= the trainers' micro-batches in "
                 "flight, or backwards compute their forward again)")
      ->capture_default_str();
  app.add_option("--data", o.data_dir, "A trainer's data folder (default: the job's data.dir)");
  app.add_option("--out", o.out_dir, "A trainer's output folder (default: the job's out_dir)");
  app.add_option("--in-flight", o.in_flight, "Micro-batches a trainer leases and runs at once (one thread each)")
      ->capture_default_str();
  app.add_option("--join-timeout-s", join_timeout_s, "Give up joining after this long")
      ->capture_default_str();
  app.add_option("--throttle", o.throttle,
                 "A peer's compute slowed by this factor >= 1 (several peers on one machine as "
                 "several slower devices)")
      ->capture_default_str();
  std::string slow_after;
  app.add_option("--slow-after", slow_after,
                 "SECONDS:FACTOR: a peer becomes FACTOR times slower SECONDS after it starts (a "
                 "straggler, for tests and benchmarks)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  auto bad = [](const std::string& what) {
    return WorkerFail(absl::InvalidArgumentError(what));
  };
  std::string host;
  int port = 0;
  if (absl::Status s = SplitHostPort(o.coordinator, "--join", 1, &host, &port); !s.ok()) {
    return WorkerFail(s);
  }
  if (absl::Status s = SplitHostPort(o.listen, "--listen", 0, &host, &port); !s.ok()) {
    return WorkerFail(s);
  }
  if (!o.advertise.empty()) {
    if (absl::Status s = SplitHostPort(o.advertise, "--advertise", 1, &host, &port); !s.ok()) {
      return WorkerFail(s);
    }
  }
  if (absl::Status s = runtime::Throttle::CheckFactor(o.throttle, "--throttle"); !s.ok()) {
    return WorkerFail(s);
  }
  if (!slow_after.empty()) {
    const std::vector<std::string> parts = absl::StrSplit(slow_after, ':');
    double seconds = 0, factor = 0;
    if (parts.size() != 2 || !absl::SimpleAtod(parts[0], &seconds) ||
        !absl::SimpleAtod(parts[1], &factor) || !std::isfinite(seconds) || seconds < 0 ||
        seconds > 86400 || !runtime::Throttle::CheckFactor(factor, "--slow-after").ok()) {
      return bad(absl::StrCat("--slow-after must be SECONDS:FACTOR with SECONDS in [0, 86400] "
                              "and FACTOR >= 1, got '", slow_after, "'"));
    }
    o.slow_after_s = seconds;
    o.slow_factor = factor;
  }
  if (o.trainer && (o.throttle != 1 || !slow_after.empty())) {
    return bad("--throttle and --slow-after are a peer's: a trainer computes nothing");
  }
  if (o.catchup_steps < 0 || o.catchup_steps > 64) {
    return bad(absl::StrCat("--catchup-steps must be in [0, 64], got ", o.catchup_steps));
  }
  if (o.cache_slots < 1 || o.cache_slots > 4096) {
    return bad(absl::StrCat("--cache-slots must be in [1, 4096], got ", o.cache_slots));
  }
  if (o.trainer && app.count("--cache-slots") > 0) {
    return bad("--cache-slots is a peer's: a trainer keeps no activations");
  }
  if (!std::isfinite(o.grace_s) || o.grace_s < 0 || o.grace_s > 3600) {
    return bad(absl::StrCat("--grace-s must be in [0, 3600], got ", o.grace_s));
  }
  if (o.in_flight < 1 || o.in_flight > 256) {
    return bad(absl::StrCat("--in-flight must be in [1, 256], got ", o.in_flight));
  }
  if (!std::isfinite(join_timeout_s) || join_timeout_s <= 0 || join_timeout_s > 86400) {
    return bad(absl::StrCat("--join-timeout-s must be in (0, 86400], got ", join_timeout_s));
  }
  if (o.trainer && (!o.advertise.empty() || !o.tls_cert_file.empty())) {
    return bad("--advertise and --tls-cert are a peer's: a trainer serves nothing");
  }
  if (!o.trainer && (!o.data_dir.empty() || !o.out_dir.empty())) {
    return bad("--data and --out are a trainer's (add --trainer)");
  }
  o.join_timeout = absl::Seconds(join_timeout_s);
  if (!token_file.empty()) {
    absl::StatusOr<std::string> token = ReadTokenFile(token_file);
    if (!token.ok()) return WorkerFail(token.status());
    o.token = *token;
  }
  std::unique_ptr<PreemptionWatch> watcher;
  if (!watch.url.empty()) {
    if (!std::isfinite(poll_s)) return bad("--preemption-poll-s must be a number");
    watch.poll = absl::Milliseconds(std::llround(poll_s * 1000));
    if (absl::Status s = PreemptionWatch::Check(watch); !s.ok()) return WorkerFail(s);
  } else if (!watch.headers.empty()) {
    return bad("--preemption-header goes with --preemption-url");
  }
  InstallStopHandler();
  if (!watch.url.empty()) watcher = std::make_unique<PreemptionWatch>(watch, StopRequested());
  return o.trainer ? RunSwarmTrainer(o, StopRequested()) : RunSwarmPeer(o, StopRequested());
}

}  // namespace shoal::launch
