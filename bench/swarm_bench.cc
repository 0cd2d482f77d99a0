// shoal bench swarm: a swarm against the static pipeline it replaces, with real processes on
// 127.0.0.1, every one slowed by --throttle so that several fit this machine's cores as several
// devices (docs/swarm.md, docs/benchmarks.md):
//
//   static        `shoal run --nproc-per-node 6 --max-restarts K -- train` with parallel.pp = 3
//                 (dp = 2 from the world), checkpoint.every = 5; with churn a rank is killed -9
//                 every --kill-every seconds and the launcher restarts the group from the newest
//                 checkpoint.
//   swarm         `shoal coordinator --swarm` with 3 stages x 2 peers and one trainer,
//                 checkpoint.every = 5 as the static job (a stage that loses every peer holding
//                 its state rolls the swarm back to the newest checkpoint); with churn a peer is
//                 killed -9 every --kill-every seconds and a fresh one joins at once.
//   straggler     4 peers: two fast ones on stage 0, a stage-1 peer 4x slower than them and a
//                 stage-2 peer 2x slower (launch_swarm_test's layout), with the rebalancer
//                 (--rebalance-s 3) against without it (--rebalance-s 0). `shoal simulate
//                 --swarm`'s model of the same two arms (the same SwarmState policy, each peer at
//                 this machine's measured fp32 GEMM rate over its throttle) predicts their ratio.
//   simulated     the two kill arms predicted from the two without: the device's rate on this
//                 job calibrated on the static arm's steady step, a start as its time to the
//                 first step less that step, and the swarm's step boundary (simulation.round_s)
//                 on the swarm arm's steady step. The swarm with kills by `shoal simulate
//                 --swarm` (6 preemptible peers at that rate, one killed every --kill-every s,
//                 replaced after a start), the static pipeline's by every kill costing a start
//                 and the steps since the newest checkpoint (scheduler::SimulateStaticRestarts).
//   links         (root) the swarm of the churn arms on --links-config, every process (the
//                 coordinator, 6 peers, the trainer) in a network namespace of its own behind a
//                 veth shaped with tc tbf to --link-mbit each way (bench/shaped_network.h): DeMo
//                 stage rounds (swarm.sync = auto, which must choose DeMo there) against fp32
//                 sums at that rate, and DeMo (swarm.sync = demo) on the same namespaces
//                 unshaped; --links-micro-batches x --links-batch-size sequences a step, their
//                 activations --links-codec (int8: blockwise 8-bit, as swarms on slow links
//                 send them) on the wire.
//
// Every arm trains the same job (the same global batch: each static replica runs
// --micro-batches micro-batches of --batch-size sequences, the swarm twice as many of the same
// size, so every process computes micro-batches of one size) for --seconds from its first
// process, and its committed tokens/s is the steps it got through (the static pipeline: the
// furthest step any incarnation logged, which its stop then checkpoints; the swarm: the steps
// applied) times the tokens per step, over those seconds. Work redone after a restart counts once.
// The last line is one JSON object.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/time.h"
#include "bench/bench_runs.h"
#include "bench/benches.h"
#include "bench/shaped_network.h"
#include "common/file_util.h"
#include "common/net_util.h"
#include "common/status.h"
#include "runtime/config.h"
#include "runtime/profiler.h"
#include "scheduler/layout_solver.h"
#include "scheduler/simulator.h"
#include "scheduler/swarm_simulator.h"

namespace shoal::bench {
namespace {

using SteadyClock = std::chrono::steady_clock;

double SecondsSince(SteadyClock::time_point t0) {
  return std::chrono::duration<double>(SteadyClock::now() - t0).count();
}

// An integer field of a status object (protobuf's JSON writes int64 as a string); 0 if absent.
int64_t JsonInt(const nlohmann::json& j, const char* key) {
  if (!j.is_object() || !j.contains(key)) return 0;
  if (j[key].is_number_integer()) return j[key].get<int64_t>();
  int64_t v = 0;
  return j[key].is_string() && absl::SimpleAtoi(j[key].get<std::string>(), &v) ? v : 0;
}

// The children of process `pid` (Linux: /proc/PID/task/PID/children).
std::vector<pid_t> ChildrenOf(pid_t pid) {
  std::vector<pid_t> out;
  absl::StatusOr<std::string> text =
      ReadFileToString(absl::StrCat("/proc/", pid, "/task/", pid, "/children"));
  if (!text.ok()) return out;
  for (absl::string_view part : absl::StrSplit(*text, ' ', absl::SkipWhitespace())) {
    int v = 0;
    if (absl::SimpleAtoi(part, &v)) out.push_back(v);
  }
  return out;
}

struct Options {
  std::string config;
  std::vector<std::string> sets;
  double seconds = 120;
  // A step of the churn and straggler arms: each of the static pipeline's two replicas runs
  // micro_batches micro-batches of batch_size sequences; the swarm runs twice as many of the
  // same size (a stage's two peers share them, as the two replicas do), so every process
  // computes micro-batches of one size.
  int micro_batches = 8;
  int batch_size = 4;
  int in_flight = 8;  // the swarm trainer's micro-batches at once (shoal worker --in-flight)
  double throttle = 4;
  double kill_every_s = 15;
  std::string arms = "churn,straggler";
  std::set<std::string> arm_set;  // `arms`, split and checked
  std::string links_config = "configs/small.toml";  // the links arms' job
  int links_micro_batches = 4;
  int links_batch_size = 2;
  std::string links_codec = "int8";  // activations on the links arms' wire
  double link_mbit = 100;
  std::string work_dir;  // empty: a temporary folder, removed at the end
  uint64_t seed = 1;
};

// One swarm arm: its peers (each one's worker flags), what happens to it, and where it runs.
struct SwarmArm {
  std::string name;
  std::vector<std::vector<std::string>> peer_flags;
  bool churn = false;
  double rebalance_s = 0;
  bool links = false;              // the links arms' job (--links-config) instead of --config
  std::vector<std::string> sets;   // config overrides after the bench's own
  ShapedNetwork* net = nullptr;    // hosts 0: the coordinator, 1..peers, then the trainer
};

struct ArmResult {
  double wall_s = 0;
  int64_t steps = 0;
  double tokens_per_s = 0;
  int kills = 0;
  int64_t replays = 0, lost = 0, duplicates = 0, moves = 0, restarts = 0;
  // The no-kill churn arms: from launch to the first step (the static job's rank 0 logged it;
  // the swarm applied it); -1: none or not read.
  double first_step_s = -1;
};

class SwarmBench {
 public:
  explicit SwarmBench(Options o) : o_(std::move(o)), rng_(o_.seed) {}

  absl::Status Init() {
    SHOAL_ASSIGN_OR_RETURN(config_, runtime::LoadConfig(o_.config, o_.sets));
    if (config_.model.n_layer < 3) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--config: the pipeline has 3 stages; model.n_layer = ", config_.model.n_layer));
    }
    if (o_.arm_set.count("links") != 0) {
      SHOAL_ASSIGN_OR_RETURN(links_config_, runtime::LoadConfig(o_.links_config, o_.sets));
      if (links_config_.model.n_layer < 3) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--links-config: the swarm has 3 stages; model.n_layer = ",
            links_config_.model.n_layer));
      }
      if (!PathExists(links_config_.data.dir + "/train.bin")) {
        return absl::FailedPreconditionError(absl::StrCat(
            "--links-config: data.dir = ", links_config_.data.dir, " has no train.bin"));
      }
    }
    if (o_.work_dir.empty()) {
      char tmpl[] = "/tmp/shoal_bench_swarm_XXXXXX";
      if (::mkdtemp(tmpl) == nullptr) return absl::InternalError("mkdtemp failed");
      dir_ = tmpl;
      remove_dir_ = true;
    } else {
      dir_ = o_.work_dir;
      SHOAL_RETURN_IF_ERROR(MakeDirs(dir_));
    }
    SHOAL_RETURN_IF_ERROR(WriteFileAtomic(dir_ + "/token", "bench-swarm-token\n"));
    if (!PathExists(config_.data.dir + "/train.bin")) {
      return absl::FailedPreconditionError(absl::StrCat(
          "--config: data.dir = ", config_.data.dir, " has no train.bin (run `shoal prepare-data`"
          " first, or --set data.dir=...)"));
    }
    // Many processes on few cores: one thread each, and no spinning while they wait.
    ::setenv("OMP_NUM_THREADS", "1", 1);
    ::setenv("OPENBLAS_NUM_THREADS", "1", 1);
    ::setenv("OMP_WAIT_POLICY", "passive", 1);
    return absl::OkStatus();
  }
  ~SwarmBench() {
    if (remove_dir_) (void)RemoveAll(dir_);
  }

  // Tokens a step of the churn and straggler arms' job, or of the links arms'.
  double TokensPerStep(bool links) const {
    return links ? static_cast<double>(o_.links_micro_batches) * o_.links_batch_size *
                       links_config_.model.block_size
                 : static_cast<double>(SwarmMicroBatches()) * o_.batch_size *
                       config_.model.block_size;
  }

  // Steps between checkpoints, both systems: what a kill can cost the static job (its restart
  // resumes from the newest) and a swarm whose stage lost every holder of its state.
  static constexpr int kCheckpointEvery = 5;

  // The swarm's micro-batches a step in the churn and straggler arms (Options::micro_batches).
  int SwarmMicroBatches() const { return 2 * o_.micro_batches; }

  // The job's settings, as --set flags, for one arm writing under `out`.
  std::vector<std::string> Sets(const std::string& out, int micro_batches, int batch_size,
                                int checkpoint_every) {
    // One BLAS thread a process, as `shoal run` gives 6 ranks on a host; --set may change it.
    std::vector<std::string> v = {"--set", "train.blas_threads=1"};
    for (const std::string& s : o_.sets) v.insert(v.end(), {"--set", s});
    for (const std::string& s :
         {absl::StrCat("train.out_dir=", out), std::string("train.steps=1000000"),
          absl::StrCat("train.batch_size=", batch_size),
          absl::StrCat("train.grad_accum=", micro_batches), std::string("train.log_every=1"),
          std::string("train.eval_every=0"),
          absl::StrCat("checkpoint.every=", checkpoint_every)}) {
      v.insert(v.end(), {"--set", s});
    }
    return v;
  }

  absl::StatusOr<ArmResult> Static(const std::string& name, bool churn) {
    const std::string out = dir_ + "/" + name;
    std::vector<std::string> args = {"run", "--standalone", "--nproc-per-node", "6",
                                     "--max-restarts", "1000", "--", "train", "--config",
                                     o_.config, "--set", "parallel.pp=3", "--throttle",
                                     absl::StrCat(o_.throttle)};
    for (const std::string& s : Sets(out, o_.micro_batches, o_.batch_size, kCheckpointEvery)) {
      args.push_back(s);
    }
    std::fprintf(stderr, "shoal bench swarm: %s: the static pipeline (pp 3, dp 2)%s\n",
                 name.c_str(), churn ? ", a rank killed every --kill-every s" : "");
    ChildProcess run;
    const auto t0 = SteadyClock::now();
    SHOAL_RETURN_IF_ERROR(run.Start(args, out + ".log"));
    ArmResult r;
    double next_kill = o_.kill_every_s;
    int code = -1;
    while ((code = run.Poll()) < 0 && SecondsSince(t0) < o_.seconds) {
      if (!churn && r.first_step_s < 0) {
        // The start (launch, rendezvous, loading, the first step) the simulated arms charge for
        // every restart, to within the 0.1 s of this loop (read on the no-kill arm only).
        absl::StatusOr<std::string> log = ReadFileToString(run.log());
        if (log.ok() && log->find("] step ") != std::string::npos) {
          r.first_step_s = SecondsSince(t0);
        }
      }
      if (churn && SecondsSince(t0) >= next_kill) {
        const std::vector<pid_t> ranks = ChildrenOf(run.pid());
        if (ranks.size() == 6) {
          const pid_t victim = ranks[std::uniform_int_distribution<size_t>(0, 5)(rng_)];
          ::kill(victim, SIGKILL);
          ++r.kills;
          next_kill += o_.kill_every_s;
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    r.wall_s = SecondsSince(t0);
    if (code >= 0) {
      return absl::InternalError(absl::StrCat(name, ": `shoal run` exited ", code,
                                              " before the end; see ", run.log()));
    }
    run.Stop();  // SIGTERM: the ranks agree on a step and checkpoint it
    absl::StatusOr<std::string> log = ReadFileToString(run.log());
    if (log.ok()) {
      for (size_t at = log->find("restarting the worker group"); at != std::string::npos;
           at = log->find("restarting the worker group", at + 1)) {
        ++r.restarts;
      }
      // rank 0's log lines: "step N/TOTAL | loss ...".
      for (size_t at = log->find("] step "); at != std::string::npos;
           at = log->find("] step ", at + 1)) {
        int64_t step = 0;
        const size_t end = log->find('/', at);
        if (end != std::string::npos && end - at < 24 &&
            absl::SimpleAtoi(absl::StripAsciiWhitespace(log->substr(at + 7, end - at - 7)),
                             &step)) {
          r.steps = std::max(r.steps, step);
        }
      }
    }
    r.tokens_per_s = static_cast<double>(r.steps) * TokensPerStep(/*links=*/false) / r.wall_s;
    return r;
  }

  // A swarm of `arm.peer_flags.size()` peers (started in order, each once it is in the roster)
  // and one trainer, to the end of its steps.
  absl::StatusOr<ArmResult> Swarm(const SwarmArm& arm) {
    const std::string& name = arm.name;
    const std::vector<std::vector<std::string>>& peer_flags = arm.peer_flags;
    const bool churn = arm.churn;
    const int peer_hosts = static_cast<int>(peer_flags.size());
    if (arm.net != nullptr && arm.net->hosts() < peer_hosts + 2) {
      return absl::InternalError(absl::StrCat(name, ": ", arm.net->hosts(), " hosts for ",
                                              peer_hosts, " peers"));
    }
    // Host h's namespace and address (host 0: the coordinator; the trainer: after the peers).
    auto host = [&](int h) {
      return arm.net == nullptr ? std::string("127.0.0.1") : arm.net->address(h);
    };
    auto place = [&](ChildProcess& c, int h) {
      if (arm.net != nullptr) c.set_netns(arm.net->netns(h));
    };
    const std::string out = dir_ + "/" + name;
    const std::string ports = out + ".ports";
    // A kept --work-dir holds the last run's port file: read, it would name a stopped coordinator.
    std::error_code gone;
    std::filesystem::remove(ports, gone);
    std::vector<std::string> args = {
        "coordinator", "--swarm", "--config", arm.links ? o_.links_config : o_.config,
        "--stages", "3", "--listen", host(0) + ":0", "--http", host(0) + ":0", "--port-file",
        ports, "--token-file", dir_ + "/token", "--heartbeat-s", "0.25", "--lease-s", "5",
        "--rebalance-s", absl::StrCat(arm.rebalance_s)};
    const int micro_batches = arm.links ? o_.links_micro_batches : SwarmMicroBatches();
    const int batch_size = arm.links ? o_.links_batch_size : o_.batch_size;
    // The links arms compare swarms with each other, their steps a checkpoint apart unmeasured.
    const int checkpoint_every = arm.links ? 0 : kCheckpointEvery;
    for (const std::string& s : Sets(out, micro_batches, batch_size, checkpoint_every)) {
      args.push_back(s);
    }
    for (const std::string& s : arm.sets) args.insert(args.end(), {"--set", s});
    if (arm.links) args.insert(args.end(), {"--codec", o_.links_codec});
    const std::string where =
        arm.net == nullptr     ? ""
        : arm.net->mbit() > 0 ? absl::StrCat(", links at ", arm.net->mbit(), " Mb/s")
                              : ", namespaces, links unshaped";
    std::fprintf(stderr, "shoal bench swarm: %s: %zu peers + 1 trainer%s%s%s\n", name.c_str(),
                 peer_flags.size(), churn ? ", a peer killed every --kill-every s" : "",
                 arm.rebalance_s > 0 ? ", rebalancing" : "", where.c_str());
    const auto t0 = SteadyClock::now();
    ChildProcess coordinator;
    place(coordinator, 0);
    SHOAL_RETURN_IF_ERROR(coordinator.Start(args, out + "-coordinator.log"));
    // Written at once with both ports (`--port-file`).
    SHOAL_ASSIGN_OR_RETURN(const nlohmann::json ports_json,
                           WaitForPortFile(coordinator, ports, absl::Seconds(60)));
    http_ = absl::StrCat(host(0), ":", JsonInt(ports_json, "http"));
    const std::string join = absl::StrCat(host(0), ":", JsonInt(ports_json, "grpc"));
    std::vector<ChildProcess> peers;
    std::vector<std::vector<std::string>> flags_of;  // per started peer
    auto launch_peer = [&](const std::vector<std::string>& flags) -> absl::Status {
      const size_t n = peers.size();
      const std::string id = absl::StrCat(name, "-p", n);
      // Peers take the hosts in turn (churn: a replacement shares a host).
      const int h = 1 + static_cast<int>(n % static_cast<size_t>(peer_hosts));
      std::vector<std::string> a = {"worker", "--join", join, "--token-file", dir_ + "/token",
                                    "--name", id, "--grace-s", "5", "--listen", host(h) + ":0"};
      a.insert(a.end(), flags.begin(), flags.end());
      ChildProcess c;
      place(c, h);
      SHOAL_RETURN_IF_ERROR(c.Start(a, dir_ + "/" + id + ".log"));
      peers.push_back(std::move(c));
      flags_of.push_back(flags);
      return absl::OkStatus();
    };
    // Until peer `i` is in the roster.
    auto await_join = [&](size_t i) -> absl::Status {
      const std::string id = absl::StrCat(name, "-p", i);
      const auto w0 = SteadyClock::now();
      while (SecondsSince(w0) < 60) {
        const nlohmann::json s = Status();
        if (s.is_object() && s.dump().find("\"" + id + "\"") != std::string::npos) {
          return absl::OkStatus();
        }
        if (peers[i].Poll() >= 0) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
      return absl::InternalError(absl::StrCat(name, ": peer ", id, " did not join; see ",
                                              peers[i].log()));
    };
    auto start_peer = [&](const std::vector<std::string>& flags) -> absl::Status {
      SHOAL_RETURN_IF_ERROR(launch_peer(flags));
      return await_join(peers.size() - 1);
    };
    if (std::all_of(peer_flags.begin(), peer_flags.end(),
                    [&](const std::vector<std::string>& f) { return f == peer_flags[0]; })) {
      // Alike peers start together, as a static job's ranks do: the join rule may place them in
      // any order.
      for (const std::vector<std::string>& f : peer_flags) SHOAL_RETURN_IF_ERROR(launch_peer(f));
      for (size_t i = 0; i < peers.size(); ++i) SHOAL_RETURN_IF_ERROR(await_join(i));
    } else {
      // Each in the roster before the next one starts, so the join rule places them in order.
      for (const std::vector<std::string>& f : peer_flags) SHOAL_RETURN_IF_ERROR(start_peer(f));
    }
    ChildProcess trainer;
    place(trainer, peer_hosts + 1);
    SHOAL_RETURN_IF_ERROR(trainer.Start({"worker", "--join", join, "--token-file",
                                         dir_ + "/token", "--trainer", "--name", name + "-t",
                                         "--out", out, "--in-flight",
                                         absl::StrCat(o_.in_flight)},
                                        out + "-trainer.log"));
    ArmResult r;
    double next_kill = o_.kill_every_s;  // from the coordinator's start, as the static arm's
    int code = -1;
    while ((code = trainer.Poll()) < 0 && SecondsSince(t0) < o_.seconds) {
      if (!churn && !arm.links && r.first_step_s < 0) {
        // The swarm's start, as the static arm's (the simulated arms calibrate on both).
        const nlohmann::json st = Status();
        if (st.is_object() && st.contains("swarm") && JsonInt(st["swarm"], "next_step") >= 1) {
          r.first_step_s = SecondsSince(t0);
        }
      }
      if (churn && SecondsSince(t0) >= next_kill) {
        std::vector<size_t> live;
        for (size_t i = 0; i < peers.size(); ++i) {
          if (peers[i].Poll() < 0) live.push_back(i);
        }
        if (!live.empty()) {
          const size_t victim = live[std::uniform_int_distribution<size_t>(0, live.size() - 1)(
              rng_)];
          peers[victim].Kill9();
          ++r.kills;
          SHOAL_RETURN_IF_ERROR(start_peer(flags_of[victim]));
        }
        next_kill += o_.kill_every_s;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    r.wall_s = SecondsSince(t0);
    const nlohmann::json s = Status();
    if (code >= 0) {
      return absl::InternalError(absl::StrCat(name, ": the trainer exited ", code,
                                              " before the end; see ", trainer.log()));
    }
    if (s.is_object() && s.contains("swarm")) {
      const nlohmann::json& sw = s["swarm"];
      r.steps = JsonInt(sw, "next_step");
      const nlohmann::json& c = sw["counters"];
      r.replays = JsonInt(c, "replays");
      r.lost = JsonInt(c, "lost");
      r.duplicates = JsonInt(c, "duplicates");
      r.moves = JsonInt(c, "moves");
    }
    r.tokens_per_s = static_cast<double>(r.steps) * TokensPerStep(arm.links) / r.wall_s;
    std::vector<ChildProcess*> all = {&trainer, &coordinator};
    for (ChildProcess& p : peers) all.push_back(&p);
    StopAll(all);
    return r;
  }

  nlohmann::json Status() {
    absl::StatusOr<HttpReply> got = HttpGet(absl::StrCat("http://", http_, "/api/status"),
                                            {}, absl::Seconds(5), int64_t{16} << 20);
    if (!got.ok() || got->status != 200) return nlohmann::json();
    return nlohmann::json::parse(got->body, nullptr, false);
  }

  absl::Status Run() {
    nlohmann::json line;
    line["seconds"] = o_.seconds;
    line["throttle"] = o_.throttle;
    line["tokens_per_step"] = TokensPerStep(/*links=*/false);
    const bool churn = o_.arm_set.count("churn") != 0;
    const bool straggler = o_.arm_set.count("straggler") != 0;
    const std::vector<std::string> base = {"--throttle", absl::StrCat(o_.throttle)};
    if (churn) {
      SHOAL_ASSIGN_OR_RETURN(ArmResult static_free, Static("static", false));
      SHOAL_ASSIGN_OR_RETURN(ArmResult static_churn, Static("static-churn", true));
      const std::vector<std::vector<std::string>> six(6, base);
      // fp32 rounds: the static pipeline's AdamW.
      SHOAL_ASSIGN_OR_RETURN(ArmResult swarm_free,
                             Swarm({"swarm", six, false, 0, false, {"swarm.sync=fp32"}}));
      SHOAL_ASSIGN_OR_RETURN(ArmResult swarm_churn,
                             Swarm({"swarm-churn", six, true, 0, false, {"swarm.sync=fp32"}}));
      Print("static, no kills", static_free);
      Print("static, kills", static_churn);
      Print("swarm, no kills", swarm_free);
      Print("swarm, kills", swarm_churn);
      line["tokens_per_s_static"] = static_churn.tokens_per_s;
      line["tokens_per_s_swarm"] = swarm_churn.tokens_per_s;
      line["tokens_per_s_static_no_kills"] = static_free.tokens_per_s;
      line["tokens_per_s_swarm_no_kills"] = swarm_free.tokens_per_s;
      // null when the static job committed nothing between its kills (it never reached a
      // checkpoint): no finite ratio.
      line["churn_ratio"] = static_churn.tokens_per_s > 0
                                ? nlohmann::json(swarm_churn.tokens_per_s /
                                                 static_churn.tokens_per_s)
                                : nlohmann::json(nullptr);
      line["churn_free_ratio"] = swarm_free.tokens_per_s / static_free.tokens_per_s;
      line["kills"] = swarm_churn.kills;
      line["static_kills"] = static_churn.kills;
      line["static_restarts"] = static_churn.restarts;
      line["replayed_microbatches"] = swarm_churn.replays;
      line["lost_microbatches"] = swarm_churn.lost;
      line["duplicate_microbatches"] = swarm_churn.duplicates;
      line["static_start_s"] = static_free.first_step_s >= 0
                                   ? nlohmann::json(static_free.first_step_s)
                                   : nlohmann::json(nullptr);
      absl::StatusOr<SimulatedChurn> predicted = SimulateChurnArms(static_free, swarm_free);
      if (predicted.ok()) {
        // null when the simulated static job commits nothing between kills.
        line["simulated_churn_ratio"] = predicted->static_killed > 0
                                            ? nlohmann::json(predicted->swarm_killed /
                                                             predicted->static_killed)
                                            : nlohmann::json(nullptr);
        line["simulated_churn_free_ratio"] = predicted->swarm_free / predicted->static_free;
        line["simulated_round_s"] = predicted->round_s;
      } else {
        std::fprintf(stderr, "shoal bench swarm: no simulated churn ratio: %s\n",
                     std::string(predicted.status().message()).c_str());
      }
    }
    if (straggler) {
      // Relative to the machine's speed (base throttle T): two at T, one at 4T (16x), one at 2T.
      // The simulator's prediction first (a few seconds), with the machine otherwise idle.
      absl::StatusOr<double> predicted = SimulatedStragglerRatio();
      if (predicted.ok()) {
        line["simulated_straggler_ratio"] = *predicted;
      } else {
        std::fprintf(stderr, "shoal bench swarm: no simulated straggler ratio: %s\n",
                     std::string(predicted.status().message()).c_str());
      }
      const std::string t = absl::StrCat(o_.throttle), t2 = absl::StrCat(2 * o_.throttle);
      const std::vector<std::vector<std::string>> layout = {
          {"--throttle", t}, {"--throttle", t, "--slow-after", "0:4"}, {"--throttle", t2},
          {"--throttle", t}};
      SHOAL_ASSIGN_OR_RETURN(ArmResult still,
                             Swarm({"straggler", layout, false, 0, false, {"swarm.sync=fp32"}}));
      SHOAL_ASSIGN_OR_RETURN(
          ArmResult moved,
          Swarm({"straggler-rebalanced", layout, false, 3, false, {"swarm.sync=fp32"}}));
      Print("straggler, no rebalancing", still);
      Print("straggler, rebalancing", moved);
      line["straggler_ratio"] = moved.tokens_per_s / still.tokens_per_s;
      line["straggler_moves"] = moved.moves;
    }
    if (o_.arm_set.count("links") != 0) {
      // 8 hosts: the coordinator, 6 peers, the trainer. DeMo and fp32 on the shaped links, then
      // DeMo on the same namespaces unshaped.
      const std::vector<std::vector<std::string>> six(6, base);
      ArmResult demo, fp32, open;
      {
        SHOAL_ASSIGN_OR_RETURN(std::unique_ptr<ShapedNetwork> net,
                               ShapedNetwork::Create(8, o_.link_mbit));
        // DeMo by the coordinator's own choice: swarm.sync = auto on links it measures slow.
        SHOAL_ASSIGN_OR_RETURN(demo, Swarm({"links-demo", six, false, 0, true,
                                            {"swarm.sync=auto"}, net.get()}));
        absl::StatusOr<std::string> log = ReadFileToString(dir_ + "/links-demo-coordinator.log");
        if (!log.ok() || log->find("stage rounds: DeMo payloads") == std::string::npos) {
          return absl::InternalError(absl::StrCat(
              "links-demo: swarm.sync = auto did not choose DeMo at ", o_.link_mbit,
              " Mb/s (raise swarm.slow_link_mbit?); see ", dir_, "/links-demo-coordinator.log"));
        }
        SHOAL_ASSIGN_OR_RETURN(fp32, Swarm({"links-fp32", six, false, 0, true,
                                            {"swarm.sync=fp32"}, net.get()}));
      }
      {
        SHOAL_ASSIGN_OR_RETURN(std::unique_ptr<ShapedNetwork> net, ShapedNetwork::Create(8, 0));
        SHOAL_ASSIGN_OR_RETURN(open, Swarm({"links-demo-unshaped", six, false, 0, true,
                                            {"swarm.sync=demo"}, net.get()}));
      }
      const std::string at = absl::StrCat("links ", o_.link_mbit, " Mb/s, ");
      Print((at + "DeMo rounds").c_str(), demo);
      Print((at + "fp32 rounds").c_str(), fp32);
      Print("links unshaped, DeMo rounds", open);
      line["link_mbit"] = o_.link_mbit;
      line["links_codec"] = o_.links_codec;
      line["links_tokens_per_step"] = TokensPerStep(/*links=*/true);
      line["tokens_per_s_links_demo"] = demo.tokens_per_s;
      line["tokens_per_s_links_fp32"] = fp32.tokens_per_s;
      line["tokens_per_s_links_demo_unshaped"] = open.tokens_per_s;
      line["demo_speedup_shaped"] =
          fp32.tokens_per_s > 0 ? nlohmann::json(demo.tokens_per_s / fp32.tokens_per_s)
                                : nlohmann::json(nullptr);
      line["shaped_over_unshaped"] =
          open.tokens_per_s > 0 ? nlohmann::json(demo.tokens_per_s / open.tokens_per_s)
                                : nlohmann::json(nullptr);
    }
    for (const char* key : {"demo_speedup_shaped", "shaped_over_unshaped", "simulated_churn_ratio",
                            "simulated_churn_free_ratio", "simulated_round_s",
                            "simulated_straggler_ratio"}) {
      if (!line.contains(key)) line[key] = nullptr;
    }
    std::printf("%s\n", line.dump().c_str());
    return absl::OkStatus();
  }

 private:
  // The straggler arms in the swarm simulator: the four peers as device groups in the order they
  // join (so the same join rule places them), each at this machine's fp32 GEMM rate (one thread,
  // as the peers run) over its throttle, the stage-1 one 4x slower from the start; links fast
  // (127.0.0.1); --seconds of virtual time each, with --rebalance-s 3 and 0. The ratio of their
  // tokens/s.
  absl::StatusOr<double> SimulatedStragglerRatio() {
    SHOAL_ASSIGN_OR_RETURN(const double g, PeerGflops());
    std::string toml = SimulatedJob("straggler", 5, 0, o_.seconds);
    struct Peer {
      const char* name;
      double gflops;
      bool slow;
    };
    for (const Peer& p : {Peer{"fast-a", g, false}, Peer{"slow", g, true},
                          Peer{"half", g / 2, false}, Peer{"fast-b", g, false}}) {
      absl::StrAppend(&toml, "\n[[group]]\nname = \"", p.name,
                      "\"\ncount = 1\nkind = \"cpu\"\nfp32_gflops = ", p.gflops,
                      "\nhost_memory_gib = 8\nnet_gbps = 10\n",
                      p.slow ? "slow_after_s = 0\nslow_factor = 4\n" : "");
    }
    SHOAL_ASSIGN_OR_RETURN(const scheduler::ClusterSpec spec,
                           scheduler::ParseClusterToml(toml, "the straggler arms"));
    double rate[2] = {0, 0};
    for (int arm = 0; arm < 2; ++arm) {
      scheduler::SwarmSimulationOptions so;
      so.stages = 3;
      so.micro_batches = SwarmMicroBatches();
      so.steps = 1000000000;
      so.rebalance_s = arm == 0 ? 0 : 3;
      SHOAL_ASSIGN_OR_RETURN(const scheduler::SwarmSimulationResult r,
                             scheduler::SimulateSwarm(spec, so));
      rate[arm] = r.summary.mean_tokens_per_s;
      std::fprintf(stderr, "  simulated straggler, %-14s %8.0f tokens/s  moves %lld\n",
                   arm == 0 ? "no rebalancing" : "rebalancing", rate[arm],
                   static_cast<long long>(r.summary.moves));
    }
    if (!(rate[0] > 0)) return absl::InternalError("the simulated arm without moves trained nothing");
    return rate[1] / rate[0];
  }

  // One process's fp32 GEMM rate: this machine's (one thread, as the processes run; profiled
  // once, for a second) over the throttle.
  absl::StatusOr<double> PeerGflops() {
    if (machine_gflops_ <= 0) {
      runtime::ProfileOptions po;
      po.seconds = 1.0;
      SHOAL_ASSIGN_OR_RETURN(const v1::DeviceProfile machine, runtime::ProfileDevice(po));
      machine_gflops_ = machine.fp32_gflops();
    }
    return machine_gflops_ / o_.throttle;
  }

  // A devices file's [job] (the swarm arms' job) and [simulation] tables, `seconds` of virtual
  // time; the [[group]]s follow.
  std::string SimulatedJob(const std::string& name, double lease_s, double replace_after_s,
                           double seconds, double round_s = 0) const {
    return absl::StrCat(
        "[job]\nname = \"bench-swarm-", name, "\"\nn_layer = ", config_.model.n_layer,
        "\nn_head = ", config_.model.n_head, "\nn_embd = ", config_.model.n_embd,
        "\nblock_size = ", config_.model.block_size, "\nvocab_size = ", config_.model.vocab_size,
        "\nglobal_batch = ", SwarmMicroBatches() * o_.batch_size, "\n\n[simulation]\nlease_s = ",
        lease_s, "\nheartbeat_s = ", std::min(0.25, lease_s / 2), "\nreplace_after_s = ",
        replace_after_s, "\nreport_every_s = ", std::max(1.0, seconds),
        "\nmax_hours = ", seconds / 3600, "\nround_s = ", round_s, "\n");
  }

  // The kill arms' prediction, calibrated on the two arms without kills (as a simulator is
  // calibrated on a profile of the job), each arm's steady rate over kSimulatedChurnS of virtual
  // time (so the start of a run weighs little), tokens/s:
  //   rate    the peers' fp32 rate: PeerGflops() scaled so that the static pipeline's modelled
  //           step (PipelineStepSeconds of the uniform 3-stage split, each micro-batch's FLOPs
  //           at that rate) equals the static arm's measured steady step (its time after the
  //           first step over its steps after the first);
  //   start   the static arm's time to its first step less one steady step (the first step is
  //           work the job keeps);
  //   round   the swarm's step boundary (simulation.round_s: the round's connections, the
  //           report, the next step's lease), which the simulator cannot know: the swarm arm's
  //           measured steady step (as the static arm's) less the one simulated without it.
  // Then the two kill arms are predicted:
  //   swarm   6 preemptible peers at that rate and round, one of them killed every --kill-every
  //           s (which one drawn by the seed: averaged over 4 seeds), replaced a start later;
  //           fenced 1 s after they fail (the live swarm fences a peer as soon as a call to it
  //           fails); checkpoints as the arms'.
  //   static  the measured steady step; every --kill-every s a kill costs a start and the steps
  //           since the newest checkpoint (SimulateStaticRestarts), averaged over starts spread
  //           over one checkpoint interval around the measured one.
  // The no-kill arms come out as measured but for the swarm's round, which is not negative (a
  // simulated swarm slower than the real one keeps round 0): their ratio checks the fit.
  static constexpr double kSimulatedChurnS = 1800;
  struct SimulatedChurn {
    double static_free = 0, static_killed = 0, swarm_free = 0, swarm_killed = 0;
    double round_s = 0;  // the calibrated simulation.round_s
  };
  absl::StatusOr<SimulatedChurn> SimulateChurnArms(const ArmResult& measured,
                                                   const ArmResult& measured_swarm) {
    if (measured.first_step_s < 0 || measured.steps < 2 ||
        !(measured.wall_s > measured.first_step_s)) {
      return absl::UnavailableError(
          "the static arm logged fewer than two steps: no start or step time to calibrate on");
    }
    const double step_s =
        (measured.wall_s - measured.first_step_s) / static_cast<double>(measured.steps - 1);
    const double start_s = std::max(0.0, measured.first_step_s - step_s);
    // The static pipeline's step at PeerGflops(): a micro-batch of --batch-size sequences through
    // each stage's blocks (and the head on the last), forward and backward.
    SHOAL_ASSIGN_OR_RETURN(const double g0, PeerGflops());
    auto spec_at = [&](double gflops, double round_s) {
      std::string toml = SimulatedJob("churn", 1, start_s, kSimulatedChurnS, round_s);
      absl::StrAppend(&toml, "\n[[group]]\nname = \"peer\"\ncount = 6\npreemptible = true\n",
                      "kind = \"cpu\"\nfp32_gflops = ", gflops,
                      "\nhost_memory_gib = 8\nnet_gbps = 10\n");
      return scheduler::ParseClusterToml(toml, "the churn arms");
    };
    SHOAL_ASSIGN_OR_RETURN(const scheduler::ClusterSpec uncalibrated, spec_at(g0, 0));
    const scheduler::ModelCosts costs = scheduler::ComputeModelCosts(uncalibrated.job.model());
    const std::vector<int> split = UniformSplit(config_.model.n_layer, 3);
    const double tokens = static_cast<double>(o_.batch_size) * config_.model.block_size;
    std::vector<double> stage_s;
    for (size_t s = 0; s < split.size(); ++s) {
      double flops = tokens * split[s] * costs.block_flops_per_token;
      if (s + 1 == split.size()) flops += tokens * costs.head_flops_per_token;
      stage_s.push_back(flops / (g0 * 1e9));
    }
    const double modelled_step_s = scheduler::PipelineStepSeconds(stage_s, o_.micro_batches);
    const double g = g0 * modelled_step_s / step_s;
    auto run_swarm = [&](double round_s, double kill_every_s) -> absl::StatusOr<double> {
      SHOAL_ASSIGN_OR_RETURN(const scheduler::ClusterSpec spec, spec_at(g, round_s));
      const int seeds = kill_every_s > 0 ? 4 : 1;
      double rate = 0;
      for (int seed = 1; seed <= seeds; ++seed) {
        scheduler::SwarmSimulationOptions so;
        so.stages = 3;
        so.micro_batches = SwarmMicroBatches();
        so.in_flight = o_.in_flight;
        so.steps = 1000000000;
        so.checkpoint_every = kCheckpointEvery;
        so.kill_every_s = kill_every_s;
        so.seed = static_cast<uint64_t>(seed);
        SHOAL_ASSIGN_OR_RETURN(const scheduler::SwarmSimulationResult r,
                               scheduler::SimulateSwarm(spec, so));
        rate += r.summary.mean_tokens_per_s / seeds;
      }
      return rate;
    };
    const double per_step = TokensPerStep(/*links=*/false);
    SHOAL_ASSIGN_OR_RETURN(const double unrounded, run_swarm(0, 0));
    if (!(unrounded > 0) || !(measured_swarm.tokens_per_s > 0)) {
      return absl::UnavailableError("the swarm (measured or simulated) trained nothing without "
                                    "kills: no round time to calibrate on");
    }
    // A round's cost falls once on every step (the next step waits for it): one correction, to
    // the measured steady step (from the first step on, as the static arm's).
    const double swarm_step_s =
        measured_swarm.first_step_s >= 0 && measured_swarm.steps >= 2 &&
                measured_swarm.wall_s > measured_swarm.first_step_s
            ? (measured_swarm.wall_s - measured_swarm.first_step_s) /
                  static_cast<double>(measured_swarm.steps - 1)
            : per_step / measured_swarm.tokens_per_s;
    const double round_s = std::max(0.0, swarm_step_s - per_step / unrounded);
    double swarm[2] = {0, 0};  // [0]: no kills, [1]: kills
    SHOAL_ASSIGN_OR_RETURN(swarm[0], run_swarm(round_s, 0));
    SHOAL_ASSIGN_OR_RETURN(swarm[1], run_swarm(round_s, o_.kill_every_s));
    scheduler::StaticRestartOptions ro;
    ro.seconds = kSimulatedChurnS;
    ro.step_s = step_s;
    ro.start_s = start_s;
    ro.checkpoint_every = kCheckpointEvery;
    ro.kill_every_s = std::numeric_limits<double>::infinity();
    SHOAL_ASSIGN_OR_RETURN(const scheduler::StaticRestartResult free,
                           scheduler::SimulateStaticRestarts(ro));
    // Kills on a fixed schedule and starts of one length would land every kill at the same
    // point between two checkpoints, and the steps lost would hang on that phase (a start 0.6 s
    // longer lost 357 steps in 30 min instead of none). A real start varies by more than a step:
    // the kills' phase is taken as uniform, averaging 8 starts spread evenly over one
    // checkpoint interval around the measured one.
    const double interval_s = static_cast<double>(kCheckpointEvery) * ro.step_s;
    constexpr int kPhases = 8;
    double killed_steps = 0, kills = 0, steps_lost = 0;
    for (int j = 0; j < kPhases; ++j) {
      ro.kill_every_s = o_.kill_every_s;
      ro.start_s = std::max(0.0, start_s + ((j + 0.5) / kPhases - 0.5) * interval_s);
      SHOAL_ASSIGN_OR_RETURN(const scheduler::StaticRestartResult killed,
                             scheduler::SimulateStaticRestarts(ro));
      killed_steps += static_cast<double>(killed.steps) / kPhases;
      kills += static_cast<double>(killed.kills) / kPhases;
      steps_lost += static_cast<double>(killed.steps_lost) / kPhases;
    }
    const double static_free = static_cast<double>(free.steps) * per_step / kSimulatedChurnS;
    const double static_killed = killed_steps * per_step / kSimulatedChurnS;
    std::fprintf(stderr,
                 "  simulated churn: calibrated %.2f GFLOP/s a peer (GEMM rate %.2f: the modelled "
                 "step %.3f s against %.3f s measured), a round %.3f s; static %.0f / %.0f "
                 "tokens/s (start %.1f s, %.0f kills, %.0f steps lost), swarm %.0f / %.0f "
                 "tokens/s (no kills / kills)\n",
                 g, g0, modelled_step_s, step_s, round_s, static_free, static_killed, start_s,
                 kills, steps_lost, swarm[0], swarm[1]);
    if (!(static_free > 0) || !(swarm[0] > 0)) {
      return absl::InternalError("a simulated arm without kills trained nothing");
    }
    return SimulatedChurn{static_free, static_killed, swarm[0], swarm[1], round_s};
  }

  void Print(const char* what, const ArmResult& r) {
    std::fprintf(stderr,
                 "  %-28s %6.1f s  %5lld steps  %8.0f tokens/s  kills %d  restarts %lld  "
                 "replays %lld  lost %lld  duplicates %lld  moves %lld\n",
                 what, r.wall_s, static_cast<long long>(r.steps), r.tokens_per_s, r.kills, static_cast<long long>(r.restarts),
                 static_cast<long long>(r.replays), static_cast<long long>(r.lost),
                 static_cast<long long>(r.duplicates), static_cast<long long>(r.moves));
  }

  Options o_;
  std::mt19937_64 rng_;
  runtime::Config config_;
  std::string dir_;
  bool remove_dir_ = false;
  std::string http_;  // the coordinator's status address, HOST:PORT
  runtime::Config links_config_;
  double machine_gflops_ = 0;  // PeerGflops' profile, once measured
};

}  // namespace

int SwarmBenchMain(int argc, char** argv, const BenchHost& host) {
  CLI::App app{
      "shoal bench swarm: a swarm against the static pipeline (pp 3, dp 2) it replaces, with real processes, each "
      "--throttle slower: committed tokens/s without and with a worker killed every "
      "--kill-every s, and a straggling stage with and without the rebalancer. One JSON line."};
  Options o;
  o.config = std::string("configs/tiny.toml");
  app.add_option("--config", o.config, "The job's TOML config (data.dir must hold train.bin)")
      ->capture_default_str();
  app.add_option("--set", o.sets, "Override a config key, section.key=value");
  app.add_option("--seconds", o.seconds, "How long every arm trains")->capture_default_str()
      ->check(CLI::Range(10.0, 86400.0));
  app.add_option("--micro-batches", o.micro_batches,
                 "Micro-batches per step of each static replica (the swarm runs twice as many)")
      ->capture_default_str()->check(CLI::Range(1, 2048));
  app.add_option("--batch-size", o.batch_size, "Sequences per micro-batch, both systems")
      ->capture_default_str()->check(CLI::Range(1, 4096));
  app.add_option("--in-flight", o.in_flight, "The swarm trainer's micro-batches at once")
      ->capture_default_str()->check(CLI::Range(1, 256));
  app.add_option("--throttle", o.throttle, "Every process's slow-down factor (>= 1)")
      ->capture_default_str()->check(CLI::Range(1.0, 1000.0));
  app.add_option("--kill-every", o.kill_every_s, "Seconds between kills in the churn arms")
      ->capture_default_str()->check(CLI::Range(1.0, 3600.0));
  app.add_option("--arms", o.arms,
                 "Which arms, comma-separated: churn, straggler, links (root: shaped links)")
      ->capture_default_str();
  app.add_option("--link-mbit", o.link_mbit, "The links arms' rate, Mb/s each way")
      ->capture_default_str()->check(CLI::Range(0.1, 100000.0));
  app.add_option("--links-config", o.links_config, "The links arms' job (TOML config)")
      ->capture_default_str();
  app.add_option("--links-micro-batches", o.links_micro_batches,
                 "The links arms' micro-batches per step")
      ->capture_default_str()->check(CLI::Range(1, 4096));
  app.add_option("--links-batch-size", o.links_batch_size,
                 "The links arms' sequences per micro-batch")
      ->capture_default_str()->check(CLI::Range(1, 4096));
  app.add_option("--links-codec", o.links_codec,
                 "The links arms' activations on the wire: fp32, bf16 or int8")
      ->capture_default_str()->check(CLI::IsMember({"fp32", "bf16", "int8"}));
  app.add_option("--work-dir", o.work_dir, "Keep the arms' logs and runs here");
  app.add_option("--seed", o.seed, "Which workers are killed")->capture_default_str();
  return ParseAndRun(app, argc, argv, host, [&]() -> absl::Status {
    for (absl::string_view arm : absl::StrSplit(o.arms, ',')) {
      if (arm != "churn" && arm != "straggler" && arm != "links") {
        return absl::InvalidArgumentError(absl::StrCat(
            "--arms: '", arm, "' is not churn, straggler or links (in '", o.arms, "')"));
      }
      o.arm_set.insert(std::string(arm));
    }
    if (o.arm_set.count("links") != 0) {
      SHOAL_RETURN_IF_ERROR(ShapedNetwork::Available());
    }
    SwarmBench bench(o);
    SHOAL_RETURN_IF_ERROR(bench.Init());
    return bench.Run();
  });
}

}  // namespace shoal::bench
