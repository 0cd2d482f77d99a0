// shoal bench demo: the same training run with AdamW over a gradient all-reduce and with DeMo,
// on R real ranks, comparing bytes on the wire per step and the final validation loss.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "bench/bench_runs.h"
#include "bench/benches.h"
#include "common/file_util.h"
#include "common/progress.h"
#include "common/status.h"
#include "runtime/config.h"

namespace shoal::bench {
namespace {

struct DemoBenchOptions {
  std::string config;
  std::vector<std::string> overrides;
  int ranks = 2;
  int64_t steps = 150;
  double adamw_lr = 0;  // 0: the config's optim.lr
  double demo_lr = 0;   // 0: twice the config's optim.lr
  std::string keep;     // folder to keep the runs in; empty: a temporary one, removed after
};

// What one run left in its metrics file.
struct RunFigures {
  double val_loss = -1;
  int64_t val_step = -1;
  int64_t bytes_sent = -1;
  int64_t bytes_received = -1;
  double tokens_per_s = 0;  // mean over the logged intervals
};

absl::StatusOr<RunFigures> ReadMetrics(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::InternalError(absl::StrCat("the run wrote no metrics file ", path));
  RunFigures f;
  double tps_sum = 0;
  int tps_n = 0;
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object() || !j.contains("kind")) continue;
    if (j["kind"] == "val" && j.contains("val_loss") && j.contains("step")) {
      f.val_loss = j["val_loss"].get<double>();
      f.val_step = j["step"].get<int64_t>();
    } else if (j["kind"] == "train" && j.contains("bytes_sent")) {
      f.bytes_sent = j["bytes_sent"].get<int64_t>();
      f.bytes_received = j["bytes_received"].get<int64_t>();
      tps_sum += j["tokens_per_s"].get<double>();
      ++tps_n;
    }
  }
  if (f.val_loss < 0 || f.bytes_sent < 0) {
    return absl::InternalError(absl::StrCat(path, " holds no validation loss or no train record"));
  }
  f.tokens_per_s = tps_n > 0 ? tps_sum / tps_n : 0;
  return f;
}

absl::Status RunBenchDemo(const DemoBenchOptions& o) {
  if (o.ranks < 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--ranks must be >= 2 (DeMo exchanges between replicas), got ", o.ranks));
  }
  if (o.steps < 1) {
    return absl::InvalidArgumentError(absl::StrCat("--steps must be >= 1, got ", o.steps));
  }
  if (!(o.adamw_lr >= 0) || !(o.demo_lr >= 0)) {
    return absl::InvalidArgumentError("--adamw-lr and --demo-lr must be >= 0 (0: the default)");
  }
  std::vector<std::string> overrides = o.overrides;
  overrides.push_back(absl::StrCat("train.steps=", o.steps));
  // Both configurations must be valid before anything runs.
  SHOAL_ASSIGN_OR_RETURN(runtime::Config base, runtime::LoadConfig(o.config, overrides));
  const double adamw_lr = o.adamw_lr > 0 ? o.adamw_lr : base.optim.lr;
  const double demo_lr = o.demo_lr > 0 ? o.demo_lr : 2 * base.optim.lr;
  {
    std::vector<std::string> d = overrides;
    d.push_back("optim.name=demo");
    SHOAL_RETURN_IF_ERROR(runtime::LoadConfig(o.config, d).status());
  }

  std::string root = o.keep;
  if (root.empty()) {
    char tmpl[] = "/tmp/shoal-bench-demo-XXXXXX";
    if (::mkdtemp(tmpl) == nullptr) return absl::InternalError("cannot create a temporary folder");
    root = tmpl;
  }
  std::string sets;
  for (const std::string& s : overrides) sets += " --set '" + s + "'";
  const std::string self = SelfExecutablePath();
  auto run = [&](const std::string& name, double lr) -> absl::StatusOr<RunFigures> {
    const std::string out = absl::StrCat(root, "/", name);
    const std::string cmd = absl::StrCat(
        "'", self, "' run --standalone --nproc-per-node ", o.ranks, " -- train --config '",
        o.config, "'", sets, " --set optim.name=", name, " optim.lr=", lr, " 'train.out_dir=",
        out, "' 'checkpoint.dir=", out, "/checkpoints' train.eval_every=0 checkpoint.every=0 "
        "checkpoint.keep=1");
    std::fprintf(stderr, "bench demo: %s\n", cmd.c_str());
    SHOAL_RETURN_IF_ERROR(RunEchoing(cmd));
    return ReadMetrics(out + "/metrics.jsonl");
  };
  absl::StatusOr<RunFigures> adamw = run("adamw", adamw_lr);
  absl::StatusOr<RunFigures> demo = adamw.ok() ? run("demo", demo_lr) : adamw;
  if (o.keep.empty()) std::system(absl::StrCat("rm -rf '", root, "'").c_str());
  SHOAL_RETURN_IF_ERROR(demo.status());
  SHOAL_RETURN_IF_ERROR(adamw.status());

  const double bytes_ratio =
      static_cast<double>(adamw->bytes_sent) / static_cast<double>(demo->bytes_sent);
  const double gap = (demo->val_loss - adamw->val_loss) / adamw->val_loss;
  std::printf("bench demo: %s, %d ranks over %s, %lld steps of %d x %d tokens per rank\n",
              base.source.c_str(), o.ranks, base.parallel.backend.c_str(),
              static_cast<long long>(o.steps), base.train.batch_size * base.train.grad_accum,
              base.model.block_size);
  std::printf("DeMo: chunk %d, top-k %d, %s values, decay %g, weight decay %g; lr %g "
              "(AdamW lr %g, weight decay %g)\n",
              base.optim.demo_chunk, base.optim.demo_topk, base.optim.demo_wire.c_str(),
              base.optim.demo_decay, base.optim.demo_weight_decay, demo_lr, adamw_lr,
              base.optim.weight_decay);
  std::printf("%-24s %16s %16s %10s %10s\n", "", "sent/step/rank", "recv/step/rank", "val loss",
              "tokens/s");
  std::printf("%-24s %16s %16s %10.4f %10.0f\n", "AdamW + fp32 all-reduce",
              FormatBytes(adamw->bytes_sent).c_str(), FormatBytes(adamw->bytes_received).c_str(),
              adamw->val_loss, adamw->tokens_per_s);
  std::printf("%-24s %16s %16s %10.4f %10.0f\n", "DeMo", FormatBytes(demo->bytes_sent).c_str(),
              FormatBytes(demo->bytes_received).c_str(), demo->val_loss, demo->tokens_per_s);
  std::printf("bytes ratio (AdamW / DeMo): %.1fx; validation loss DeMo vs AdamW: %+.2f%%\n",
              bytes_ratio, 100 * gap);
  nlohmann::json j = {{"bench", "demo"},
                      {"config", o.config},
                      {"ranks", o.ranks},
                      {"backend", base.parallel.backend},
                      {"steps", o.steps},
                      {"lr_adamw", adamw_lr},
                      {"lr_demo", demo_lr},
                      {"demo_chunk", base.optim.demo_chunk},
                      {"demo_topk", base.optim.demo_topk},
                      {"demo_wire", base.optim.demo_wire},
                      {"demo_decay", base.optim.demo_decay},
                      {"bytes_adamw", adamw->bytes_sent},
                      {"bytes_demo", demo->bytes_sent},
                      {"bytes_ratio", bytes_ratio},
                      {"val_loss_adamw", adamw->val_loss},
                      {"val_loss_demo", demo->val_loss},
                      {"val_loss_gap", gap},
                      {"tokens_per_s_adamw", adamw->tokens_per_s},
                      {"tokens_per_s_demo", demo->tokens_per_s}};
  std::cout << j.dump() << std::endl;
  return absl::OkStatus();
}

}  // namespace

int DemoBenchMain(int argc, char** argv, const BenchHost& host) {
  CLI::App app{
      "The same training with AdamW over an fp32 gradient all-reduce and with DeMo, on real "
      "ranks: bytes on the wire per step and validation loss at the end; a table and a JSON line"};
  app.name("shoal bench demo");
  DemoBenchOptions o;
  app.add_option("--config", o.config, "TOML config file")->required();
  app.add_option("--set", o.overrides, "Override a config value: section.key=value (both runs)")
      ->expected(1, -1);
  app.add_option("--ranks", o.ranks, "Data-parallel ranks (>= 2)")->capture_default_str();
  app.add_option("--steps", o.steps, "Training steps of each run")->capture_default_str();
  app.add_option("--adamw-lr", o.adamw_lr, "AdamW's peak learning rate (default: optim.lr)");
  app.add_option("--demo-lr", o.demo_lr, "DeMo's peak learning rate (default: 2 x optim.lr)");
  app.add_option("--keep", o.keep, "Keep both runs (logs, metrics, checkpoints) in this folder");
  return ParseAndRun(app, argc, argv, host, [&] { return RunBenchDemo(o); });
}

}  // namespace shoal::bench
