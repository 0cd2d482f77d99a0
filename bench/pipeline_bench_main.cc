// `shoal bench pipeline`: the measured bubble of the pipeline executor's schedules against
// theory, (p - 1) / (m + p - 1), and (p - 1) / (v m + p - 1) for interleaved 1F1B with v chunks
// per rank.
//
// Outside a job, for each --stages value p this process starts p ranks of itself
// (`shoal run --standalone --nproc-per-node p -- bench pipeline --inside ...`), reads back the
// cases rank 0 prints (one marked JSON line each), and prints one table and a final JSON line for
// all of them. Inside (--inside), a rank joins a Gloo group over the launcher's environment and
// runs RunPipelineBench. A single stage needs no group and runs in this process.
#include <cmath>
#include <cstdio>
#include <iostream>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "bench/bench_main.h"
#include "comm/backend.h"
#include "comm/store.h"
#include "common/file_util.h"
#include "common/status.h"
#include "bench/benches.h"
#include "bench/pipeline_bench.h"

namespace shoal::bench {
namespace {

// Rank 0 prints each case after this marker; the outer process picks those lines out of the
// ranks' (prefixed) output.
constexpr char kCaseMarker[] = "shoal-bench-pipeline-case ";
constexpr int kMaxStages = 64;

struct Flags {
  std::string stages = "2,4";
  int micro_batches = 8;
  std::string schedule = "both";
  int virtual_stages = 2;
  double forward_ms = 20;
  double backward_ms = 40;
  std::string work = "sleep";
  int steps = 5;
  bool inside = false;
};

int UsageError(const std::string& message) {
  std::fprintf(stderr, "shoal bench pipeline: error: %s\n", message.c_str());
  return 2;
}

int Failure(const BenchHost& host, const absl::Status& status) {
  std::fprintf(stderr, "shoal bench pipeline: error: %s\n", std::string(status.message()).c_str());
  return host.exit_code(status);
}

// "2,4" -> {2, 4}; kInvalidArgument naming --stages for anything else.
absl::StatusOr<std::vector<int>> ParseStages(const std::string& text) {
  std::vector<int> out;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    int p = 0;
    if (!absl::SimpleAtoi(part, &p) || p < 1 || p > kMaxStages) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--stages takes a comma-separated list of stage counts in [1, ", kMaxStages,
          "], got \"", text, "\""));
    }
    out.push_back(p);
  }
  return out;
}

std::string ScheduleFlagName(parallel::ScheduleKind k) {
  switch (k) {
    case parallel::ScheduleKind::kGPipe: return "gpipe";
    case parallel::ScheduleKind::k1F1B: return "1f1b";
    case parallel::ScheduleKind::kInterleaved1F1B: return "interleaved";
  }
  return "?";
}

absl::StatusOr<parallel::ScheduleKind> ScheduleFromFlagName(const std::string& name) {
  for (parallel::ScheduleKind k :
       {parallel::ScheduleKind::kGPipe, parallel::ScheduleKind::k1F1B,
        parallel::ScheduleKind::kInterleaved1F1B}) {
    if (name == ScheduleFlagName(k)) return k;
  }
  return absl::InternalError(absl::StrCat("unknown schedule \"", name, "\" from a rank"));
}

// The flags as benchmark options, each checked: kInvalidArgument names the flag.
absl::StatusOr<PipelineBenchOptions> ToOptions(const Flags& f) {
  PipelineBenchOptions o;
  if (f.schedule == "1f1b") {
    o.schedules = {parallel::ScheduleKind::k1F1B};
  } else if (f.schedule == "gpipe") {
    o.schedules = {parallel::ScheduleKind::kGPipe};
  } else if (f.schedule == "interleaved") {
    o.schedules = {parallel::ScheduleKind::kInterleaved1F1B};
  } else if (f.schedule == "both") {
    o.schedules = {parallel::ScheduleKind::k1F1B, parallel::ScheduleKind::kGPipe};
  } else if (f.schedule == "all") {
    o.schedules = {parallel::ScheduleKind::k1F1B, parallel::ScheduleKind::kGPipe,
                   parallel::ScheduleKind::kInterleaved1F1B};
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "--schedule must be 1f1b, gpipe, interleaved, both or all, got \"", f.schedule, "\""));
  }
  const bool interleaved = f.schedule == "interleaved" || f.schedule == "all";
  if (interleaved && (f.virtual_stages < 2 || f.virtual_stages > 64)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--virtual-stages must be in [2, 64] for the interleaved schedule, got ",
        f.virtual_stages));
  }
  o.virtual_stages = f.virtual_stages;
  if (f.work == "sleep") {
    o.work = PipelineBenchWork::kSleep;
  } else if (f.work == "gemm") {
    o.work = PipelineBenchWork::kGemm;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--work must be sleep or gemm, got \"", f.work, "\""));
  }
  if (f.micro_batches < 1 || f.micro_batches > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("--micro-batches must be in [1, 4096], got ", f.micro_batches));
  }
  if (f.steps < 1 || f.steps > 10000) {
    return absl::InvalidArgumentError(absl::StrCat("--steps must be in [1, 10000], got ", f.steps));
  }
  for (const auto& [name, ms] : {std::pair<const char*, double>{"--forward-ms", f.forward_ms},
                                 {"--backward-ms", f.backward_ms}}) {
    if (!std::isfinite(ms) || ms < 0 || ms > 60000) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, " must be in [0, 60000], got ", absl::StrFormat("%g", ms)));
    }
  }
  o.micro_batches = f.micro_batches;
  o.steps = f.steps;
  o.forward_ms = f.forward_ms;
  o.backward_ms = f.backward_ms;
  SHOAL_RETURN_IF_ERROR(ValidatePipelineBenchOptions(o));
  return o;
}

// Every transfer and collective may wait about one step (a rank idles through the bubble); give
// that plenty of room on a loaded machine.
absl::Duration TransferTimeout(const PipelineBenchOptions& o, int stages) {
  const double step_ms = (o.micro_batches + stages - 1) * (o.forward_ms + o.backward_ms);
  return absl::Seconds(60) + absl::Milliseconds(4 * step_ms);
}

nlohmann::json CaseToJson(const PipelineBenchCase& c) {
  return {{"schedule", ScheduleFlagName(c.schedule)},
          {"stages", c.stages},
          {"virtual_stages", c.virtual_stages},
          {"micro_batches", c.micro_batches},
          {"bubble_measured", c.bubble_measured},
          {"bubble_theory", c.bubble_theory},
          {"step_s", c.step_s},
          {"compute_s", c.compute_s},
          {"peak_slots", c.peak_slots},
          {"peak_bound", c.peak_bound}};
}

absl::StatusOr<PipelineBenchCase> CaseFromJson(const nlohmann::json& j) {
  try {
    PipelineBenchCase c;
    SHOAL_ASSIGN_OR_RETURN(c.schedule, ScheduleFromFlagName(j.at("schedule").get<std::string>()));
    c.stages = j.at("stages").get<int>();
    c.virtual_stages = j.at("virtual_stages").get<int>();
    c.micro_batches = j.at("micro_batches").get<int>();
    c.bubble_measured = j.at("bubble_measured").get<double>();
    c.bubble_theory = j.at("bubble_theory").get<double>();
    c.step_s = j.at("step_s").get<double>();
    c.compute_s = j.at("compute_s").get<double>();
    c.peak_slots = j.at("peak_slots").get<std::vector<int>>();
    c.peak_bound = j.at("peak_bound").get<std::vector<int>>();
    return c;
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("malformed case from a rank: ", e.what()));
  }
}

// Inside one rank of a `shoal run` group: join the group, run, rank 0 prints the cases.
absl::Status RunInside(const BenchHost& host, const PipelineBenchOptions& options, int stages) {
  SHOAL_ASSIGN_OR_RETURN(RankEnv env, host.detect_rank());
  if (env.world_size != stages) {
    return absl::InvalidArgumentError(absl::StrCat("--stages ", stages, " with --inside needs ",
                                                   stages, " ranks, but this job has ",
                                                   env.world_size));
  }
  PipelineBenchOptions o = options;
  o.transfer.timeout = TransferTimeout(o, stages);
  comm::TcpStoreOptions so;
  so.host = env.master_addr;
  so.port = env.master_port;
  so.is_server = env.rank == 0;
  so.world_size = env.world_size;
  so.timeout = o.transfer.timeout;
  SHOAL_ASSIGN_OR_RETURN(std::shared_ptr<comm::Store> store, comm::MakeTcpStore(so));
  comm::BackendOptions bo;
  bo.kind = "gloo";
  bo.rank = env.rank;
  bo.world_size = env.world_size;
  bo.timeout = o.transfer.timeout;
  bo.store = comm::MakePrefixStore(
      absl::StrCat("shoal/bench-pipeline/restart-", env.restart_count), store);
  if (absl::StartsWith(env.master_addr, "127.") || env.master_addr == "localhost") {
    bo.gloo_hostname = "127.0.0.1";
  }
  SHOAL_ASSIGN_OR_RETURN(std::unique_ptr<comm::Backend> group, comm::CreateBackend(bo));
  SHOAL_ASSIGN_OR_RETURN(std::vector<PipelineBenchCase> cases,
                         RunPipelineBench(group.get(), o));
  if (env.rank == 0) {
    for (const PipelineBenchCase& c : cases) {
      std::printf("%s%s\n", kCaseMarker, CaseToJson(c).dump().c_str());
    }
    std::fflush(stdout);
  }
  return absl::OkStatus();
}

// Starts `stages` ranks of this binary and collects rank 0's cases; the ranks' other output
// goes to stderr.
absl::StatusOr<std::vector<PipelineBenchCase>> RunRanks(const Flags& f, int stages) {
  const std::string command = absl::StrCat(
      "'", SelfExecutablePath(), "' run --standalone --nproc-per-node ", stages,
      " -- bench pipeline --inside --stages ", stages, " --micro-batches ", f.micro_batches,
      " --schedule ", f.schedule, " --virtual-stages ", f.virtual_stages, " --forward-ms ", absl::StrFormat("%.17g", f.forward_ms),
      " --backward-ms ", absl::StrFormat("%.17g", f.backward_ms), " --work ", f.work,
      " --steps ", f.steps, " 2>&1");
  FILE* p = ::popen(command.c_str(), "r");
  if (p == nullptr) return absl::InternalError("cannot run: " + command);
  std::vector<PipelineBenchCase> cases;
  absl::Status parse_status;
  char buf[8192];
  while (std::fgets(buf, sizeof(buf), p) != nullptr) {
    const std::string line(buf);
    const size_t at = line.find(kCaseMarker);
    if (at == std::string::npos) {
      std::fputs(buf, stderr);
      continue;
    }
    const auto j = nlohmann::json::parse(line.substr(at + sizeof(kCaseMarker) - 1), nullptr,
                                         /*allow_exceptions=*/false);
    absl::StatusOr<PipelineBenchCase> c =
        j.is_object() ? CaseFromJson(j)
                      : absl::InternalError(absl::StrCat("unparsable case line: ", line));
    if (c.ok()) {
      cases.push_back(*c);
    } else if (parse_status.ok()) {
      parse_status = c.status();
    }
  }
  const int status = ::pclose(p);
  if (status != 0) {
    return absl::InternalError(
        absl::StrCat("the ", stages, "-rank run failed (wait status ", status, "): ", command));
  }
  SHOAL_RETURN_IF_ERROR(parse_status);
  if (cases.empty()) return absl::InternalError("the ranks printed no result: " + command);
  return cases;
}

}  // namespace

int PipelineBenchMain(int argc, char** argv, const BenchHost& host) {
  CLI::App app{
      "The pipeline executor on stages of fixed forward / backward time: measured bubble vs "
      "theory (p - 1) / (m + p - 1), or (p - 1) / (v m + p - 1) interleaved, per schedule and "
      "stage count; prints a table and a JSON line"};
  app.name("shoal bench pipeline");
  Flags f;
  app.add_option("--stages", f.stages, "Comma-separated pipeline sizes to run, e.g. 2,4")
      ->capture_default_str();
  app.add_option("--micro-batches", f.micro_batches, "Micro-batches per step (m)")
      ->capture_default_str();
  app.add_option("--schedule", f.schedule,
                 "1f1b, gpipe, interleaved, both (1f1b and gpipe) or all (the three)")
      ->capture_default_str();
  app.add_option("--virtual-stages", f.virtual_stages,
                 "Chunks per rank for the interleaved schedule (v >= 2); each takes 1/v of the "
                 "forward and backward time")
      ->capture_default_str();
  app.add_option("--forward-ms", f.forward_ms, "One micro-batch's forward on one rank (ms)")
      ->capture_default_str();
  app.add_option("--backward-ms", f.backward_ms, "One micro-batch's backward on one rank (ms)")
      ->capture_default_str();
  app.add_option("--work", f.work,
                 "sleep (each rank as its own device) or gemm (a 1-thread matmul loop)")
      ->capture_default_str();
  app.add_option("--steps", f.steps, "Timed steps per case (after one warm-up step)")
      ->capture_default_str();
  app.add_flag("--inside", f.inside, "Run as one rank of an already started group (internal)")
      ->group("");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  absl::StatusOr<std::vector<int>> stages = ParseStages(f.stages);
  if (!stages.ok()) return UsageError(std::string(stages.status().message()));
  absl::StatusOr<PipelineBenchOptions> options = ToOptions(f);
  if (!options.ok()) return UsageError(std::string(options.status().message()));
  // Refuse a stage count the interleaved schedule cannot use before starting any ranks.
  for (int p : *stages) {
    const absl::Status s = CheckPipelineBenchStages(*options, p);
    if (!s.ok()) return UsageError(absl::StrCat("--stages ", p, ": ", s.message()));
  }

  if (f.inside) {
    if (stages->size() != 1) return UsageError("--inside takes a single --stages value");
    const absl::Status s = RunInside(host, *options, stages->front());
    return s.ok() ? 0 : Failure(host, s);
  }

  std::vector<PipelineBenchCase> all;
  for (int p : *stages) {
    absl::StatusOr<std::vector<PipelineBenchCase>> cases;
    if (p == 1) {
      PipelineBenchOptions o = *options;
      o.transfer.timeout = TransferTimeout(o, 1);
      cases = RunPipelineBench(nullptr, o);
    } else {
      cases = RunRanks(f, p);
    }
    if (!cases.ok()) return Failure(host, cases.status());
    all.insert(all.end(), cases->begin(), cases->end());
  }
  std::printf("bench pipeline: %s work, forward %g ms + backward %g ms per micro-batch and rank "
              "(split evenly over its chunks when interleaved), "
              "%d timed steps (after 1 warm-up), activations of %s floats\n",
              f.work.c_str(), f.forward_ms, f.backward_ms, f.steps,
              absl::StrJoin(options->activation_shape, "x").c_str());
  std::printf("%s", FormatPipelineBenchTable(all).c_str());
  nlohmann::json j = {{"bench", "pipeline"},
                      {"work", f.work},
                      {"forward_ms", f.forward_ms},
                      {"backward_ms", f.backward_ms},
                      {"steps", f.steps},
                      {"cases", nlohmann::json::array()}};
  for (const PipelineBenchCase& c : all) j["cases"].push_back(CaseToJson(c));
  std::cout << j.dump() << std::endl;
  return 0;
}

}  // namespace shoal::bench
