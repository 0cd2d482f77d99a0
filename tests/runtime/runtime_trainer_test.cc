// End-to-end training through the real `shoal` binary on real files: loss falls, resume is
// bit-exact, corrupt checkpoints are skipped by name, SIGTERM checkpoints and exits.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <nlohmann/json.hpp>
#include <sstream>
#include <regex>
#include <string>
#include <vector>

#include "runtime/checkpoint.h"
#include "runtime/prepare_data.h"
#include "runtime/safetensors.h"
#include "tests/test_util.h"

namespace shoal::runtime {
namespace {

using shoal::testing::CommandResult;
using shoal::testing::RunCommand;
using shoal::testing::TempDir;

// A small model that trains in seconds.
constexpr char kConfig[] = R"([model]
n_layer = 2
n_head = 2
n_embd = 32
block_size = 32
vocab_size = 256

[train]
steps = 20
batch_size = 4
log_every = 1
eval_every = 10
eval_batches = 2
seed = 5

[optim]
lr = 3e-3
warmup_steps = 4
)";

class TrainerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    shoal::testing::WriteTextFile(tmp_ / "corpus.txt", shoal::testing::SyntheticText(60000));
    PrepareDataOptions o;
    o.inputs = {tmp_ / "corpus.txt"};
    o.out_dir = tmp_ / "data";
    o.progress = false;
    ASSERT_TRUE(PrepareData(o).ok());
    shoal::testing::WriteTextFile(tmp_ / "cfg.toml", kConfig);
  }

  // Runs `shoal train` with the run's files under tmp_/<run>.
  std::string TrainCommand(const std::string& run, const std::string& extra) {
    return std::string(SHOAL_BINARY) + " train --config " + (tmp_ / "cfg.toml") +
           " --set data.dir=" + (tmp_ / "data") + " train.out_dir=" + (tmp_ / run) + " " + extra;
  }

  CommandResult Train(const std::string& run, const std::string& extra = "") {
    return RunCommand(TrainCommand(run, extra));
  }

  // The same training in the background, for a test that signals it mid-run.
  pid_t StartTrain(const std::string& run, const std::string& extra) {
    const std::string cmd = "exec " + TrainCommand(run, extra) + " >/dev/null 2>&1";
    const pid_t pid = fork();
    if (pid == 0) {
      execl("/bin/sh", "sh", "-c", cmd.c_str(), nullptr);
      _exit(127);
    }
    return pid;
  }

  // Polls the run's log until it holds `steps` step losses or `seconds` pass (generous: a loaded
  // machine runs steps many times slower); returns how many it holds.
  size_t WaitForSteps(const std::string& run, size_t steps, int seconds) {
    for (int i = 0; i < seconds * 100; ++i) {
      if (StepLosses(run).size() >= steps) break;
      usleep(10 * 1000);
    }
    return StepLosses(run).size();
  }

  // Field `field` of every record of kind `kind` in a run's metrics.jsonl, in file order.
  std::vector<double> Metric(const std::string& run, const std::string& kind,
                             const std::string& field) {
    std::vector<double> out;
    std::istringstream in(shoal::testing::ReadTextFile(tmp_ / (run + "/metrics.jsonl")));
    std::string line;
    while (std::getline(in, line)) {
      auto j = nlohmann::json::parse(line);
      if (j["kind"] == kind) out.push_back(j[field].get<double>());
    }
    return out;
  }
  std::vector<double> StepLosses(const std::string& run) {
    return Metric(run, "train", "step_loss");
  }
  std::vector<double> ValLosses(const std::string& run) { return Metric(run, "val", "val_loss"); }

  TempDir tmp_;
};

TEST_F(TrainerTest, ValidationLossFalls) {
  CommandResult r = Train("run", "--set train.steps=40 train.eval_every=20");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::vector<double> val = ValLosses("run");
  ASSERT_EQ(val.size(), 3u) << r.output;   // steps 0, 20, 40
  EXPECT_NEAR(val[0], std::log(256.0), 0.3);  // untrained: about uniform over bytes
  EXPECT_LT(val[2], val[0] - 1.5) << r.output;
  // The log line carries everything a user looks for.
  for (const char* field : {"loss", "lr", "gnorm", "tok/s", "MFU", "elapsed", "ETA"}) {
    EXPECT_NE(r.output.find(field), std::string::npos) << field;
  }
  EXPECT_TRUE(CheckpointStore::Load(tmp_ / "run/checkpoints/step_00000040").ok());
}

TEST_F(TrainerTest, ResumeIsBitExact) {
  CommandResult straight = Train("straight");
  ASSERT_EQ(straight.exit_code, 0) << straight.output;
  CommandResult first = Train("split", "--stop-after 10");
  ASSERT_EQ(first.exit_code, 0) << first.output;
  CommandResult second = Train("split", "--resume");
  ASSERT_EQ(second.exit_code, 0) << second.output;
  EXPECT_NE(second.output.find("resumed"), std::string::npos) << second.output;

  const std::vector<double> a = StepLosses("straight"), b = StepLosses("split");
  ASSERT_EQ(a.size(), 20u);
  ASSERT_EQ(b.size(), 20u);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i], b[i]) << "step " << i + 1;

  auto wa = ReadSafetensors(tmp_ / "straight/checkpoints/step_00000020/model.safetensors");
  auto wb = ReadSafetensors(tmp_ / "split/checkpoints/step_00000020/model.safetensors");
  ASSERT_TRUE(wa.ok() && wb.ok());
  ASSERT_EQ(wa->tensors.size(), wb->tensors.size());
  for (auto& [name, t] : wa->tensors) {
    ASSERT_TRUE(wb->tensors.count(name)) << name;
    EXPECT_TRUE(t.equal(wb->tensors.at(name))) << name;
  }
}

TEST_F(TrainerTest, MomentsOffloadedToDiskTrainBitIdentically) {
  // Width 64, so the model has enough moments for ~30 chunks of 4096 elements.
  const std::string model = "--set model.n_embd=64 train.steps=8 train.eval_every=0";
  CommandResult ram = Train("ram", model);
  ASSERT_EQ(ram.exit_code, 0) << ram.output;
  auto wa = ReadSafetensors(tmp_ / "ram/checkpoints/step_00000008/model.safetensors");
  ASSERT_TRUE(wa.ok());
  // Parameters and gradients stay in RAM (8 bytes per element, alignment padding of at most 16
  // elements per tensor); the budget leaves room for 6 chunks of moments (8 bytes x 4096) beyond
  // them, about a quarter of the ~30 chunks.
  int64_t elements = 0;
  for (auto& [name, t] : wa->tensors) elements += t.numel() + 16;
  const int64_t budget = 8 * (elements + 16) + 6 * 8 * 4096;
  CommandResult disk = Train("disk", model + " memory.host_budget=" + std::to_string(budget) +
                                         " memory.disk_path=" + (tmp_ / "tier"));
  ASSERT_EQ(disk.exit_code, 0) << disk.output;
  std::smatch m;
  const std::string out = disk.output;
  ASSERT_TRUE(std::regex_search(out, m, std::regex("offloaded: (\\d+) chunks of (\\d+) bytes, at "
                                                   "most (\\d+) in RAM \\(peak (\\d+) of (\\d+) "
                                                   "bytes\\); (\\d+) loads and (\\d+) write-backs")))
      << out;
  const int chunks = std::stoi(m[1]), capacity = std::stoi(m[3]);
  EXPECT_GE(chunks, 4 * capacity) << "the moments are at least 4x over their RAM budget";
  EXPECT_LE(std::stoll(m[4]), std::stoll(m[5])) << "the budget held";
  EXPECT_GT(std::stoll(m[6]), 0) << "moments were read back from disk";
  EXPECT_GT(std::stoll(m[7]), 0) << "and written to it";
  // Same losses, weights and optimizer state, bit for bit.
  const std::vector<double> a = StepLosses("ram"), b = StepLosses("disk");
  ASSERT_EQ(a.size(), 8u);
  ASSERT_EQ(a, b);
  for (const char* file : {"model.safetensors", "optimizer.safetensors"}) {
    auto x = ReadSafetensors(tmp_ / ("ram/checkpoints/step_00000008/" + std::string(file)));
    auto y = ReadSafetensors(tmp_ / ("disk/checkpoints/step_00000008/" + std::string(file)));
    ASSERT_TRUE(x.ok() && y.ok()) << file;
    ASSERT_EQ(x->tensors.size(), y->tensors.size()) << file;
    for (auto& [name, t] : x->tensors) EXPECT_TRUE(t.equal(y->tensors.at(name))) << name;
  }
  // A budget that cannot even hold the chunks paging needs is refused by name.
  CommandResult small = Train("small", model + " memory.host_budget=100KB memory.disk_path=" +
                                           (tmp_ / "tier"));
  EXPECT_NE(small.exit_code, 0);
  EXPECT_NE(small.output.find("memory.host_budget"), std::string::npos) << small.output;
  EXPECT_NE(small.output.find("raise memory.host_budget"), std::string::npos) << small.output;
}

// 12 blocks of width 64: 0.62 M parameters, 9.9 MB of states at 16 bytes each.
constexpr char kPagedModel[] =
    "--set model.n_embd=64 model.n_layer=12 train.grad_accum=2 train.eval_every=3 ";

// Element count of a run's final checkpoint tensors, with each tensor's alignment padding.
int64_t CheckpointElements(const std::string& path) {
  auto w = ReadSafetensors(path);
  EXPECT_TRUE(w.ok()) << path;
  if (!w.ok()) return 0;
  int64_t elements = 0;
  for (auto& [name, t] : w->tensors) elements += t.numel() + 16;
  return elements;
}

void ExpectSameCheckpoint(const std::string& a, const std::string& b) {
  for (const char* file : {"model.safetensors", "optimizer.safetensors"}) {
    auto x = ReadSafetensors(a + "/" + file);
    auto y = ReadSafetensors(b + "/" + file);
    ASSERT_TRUE(x.ok() && y.ok()) << file;
    ASSERT_EQ(x->tensors.size(), y->tensors.size()) << file;
    for (auto& [name, t] : x->tensors) {
      ASSERT_TRUE(y->tensors.count(name)) << name;
      EXPECT_TRUE(t.equal(y->tensors.at(name))) << file << ": " << name;
    }
  }
}

TEST_F(TrainerTest, PagedStatesTrainBitIdentically) {
  // Clipping off: the global norm is then the only thing whose rounding depends on the layout of
  // the gradient buffer (chunked when paged), and it is not used.
  const std::string model = std::string(kPagedModel) + "train.steps=6 optim.grad_clip=0";
  CommandResult ram = Train("ram", model);
  ASSERT_EQ(ram.exit_code, 0) << ram.output;
  const int64_t states = 16 * CheckpointElements(tmp_ / "ram/checkpoints/step_00000006/model.safetensors");
  const int64_t budget = states / 4;  // the states are 4x over the host budget
  const std::string paging = " memory.host_budget=" + std::to_string(budget) +
                             " memory.disk_path=" + (tmp_ / "tier");
  CommandResult disk = Train("disk", model + paging);
  ASSERT_EQ(disk.exit_code, 0) << disk.output;
  const std::string out = disk.output;
  EXPECT_NE(out.find("memory plan"), std::string::npos) << out;
  // Without clipping the optimizer runs inside backward, chunk by chunk; the plan comes from
  // the warm-up's measurements and is set against the run at the end.
  EXPECT_NE(out.find("AdamW steps each chunk inside backward"), std::string::npos) << out;
  EXPECT_NE(out.find("memory plan from the warm-up step"), std::string::npos) << out;
  EXPECT_TRUE(std::regex_search(out, std::regex("memory plan: predicted [0-9.]+ s per step, "
                                                "measured [0-9.]+ s")))
      << out;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(
      out, m,
      std::regex("paged parameters and gradients: (\\d+) chunks of (\\d+) bytes, peak (\\d+) of "
                 "(\\d+) bytes in RAM; (\\d+) loads \\((\\d+) prefetched, (\\d+) hits\\), "
                 "(\\d+) write-backs")))
      << out;
  const int64_t paged_bytes = std::stoll(m[1]) * std::stoll(m[2]);
  const int64_t paged_peak = std::stoll(m[3]), paged_budget = std::stoll(m[4]);
  EXPECT_GE(paged_bytes, 2 * paged_budget) << "parameters and gradients mostly on disk";
  EXPECT_LE(paged_peak, paged_budget) << "the budget held";
  EXPECT_GT(std::stoll(m[5]), 0) << "chunks were read back";
  EXPECT_GT(std::stoll(m[6]), 0) << "ahead of use, from the warm-up trace";
  EXPECT_GT(std::stoll(m[7]), 0) << "and the prefetches were used";
  EXPECT_GT(std::stoll(m[8]), 0) << "dirty chunks were written back";
  std::smatch mm;
  ASSERT_TRUE(std::regex_search(out, mm, std::regex("optimizer moments offloaded: .*\\(peak (\\d+) "
                                                    "of (\\d+) bytes\\)")))
      << out;
  EXPECT_LE(std::stoll(mm[1]), std::stoll(mm[2]));
  // What stays in RAM besides (biases and norm gains with their gradients: far below 1% of the
  // states here) and the two stores' peaks together stay within the host budget.
  EXPECT_LE(paged_peak + std::stoll(mm[1]), budget);
  // What the worker tells the coordinator its disk holds: the states not in RAM.
  const std::vector<double> on_disk = Metric("disk", "train", "state_bytes_on_disk");
  ASSERT_EQ(on_disk.size(), 6u);
  EXPECT_GE(on_disk.back(), static_cast<double>(states - budget));
  // Same losses (training and validation), weights and optimizer state, bit for bit.
  const std::vector<double> a = StepLosses("ram"), b = StepLosses("disk");
  ASSERT_EQ(a.size(), 6u);
  EXPECT_EQ(a, b);
  EXPECT_EQ(ValLosses("ram"), ValLosses("disk"));
  ExpectSameCheckpoint(tmp_ / "ram/checkpoints/step_00000006", tmp_ / "disk/checkpoints/step_00000006");

  // With clipping the norm is summed over other blocks (the chunks' layout), so it may differ in
  // its last bits; the training does not otherwise.
  const std::string clipped = std::string(kPagedModel) + "train.steps=6 optim.grad_clip=0.05";
  CommandResult ram_c = Train("ram_c", clipped);
  CommandResult disk_c = Train("disk_c", clipped + paging);
  ASSERT_EQ(ram_c.exit_code, 0) << ram_c.output;
  ASSERT_EQ(disk_c.exit_code, 0) << disk_c.output;
  const std::vector<double> c = StepLosses("ram_c"), d = StepLosses("disk_c");
  ASSERT_EQ(c.size(), 6u);
  ASSERT_EQ(d.size(), 6u);
  for (size_t i = 0; i < c.size(); ++i) EXPECT_NEAR(c[i], d[i], 1e-6 * c[i]) << "step " << i + 1;
  const std::vector<double> norms = Metric("ram_c", "train", "grad_norm");
  ASSERT_FALSE(norms.empty());
  EXPECT_GT(norms.front(), 0.05) << "clipping was active";
}

TEST_F(TrainerTest, ActivationBudgetRecomputesOrOffloadsBlocksBitIdentically) {
  // 8 blocks; the budget holds the outputs of all and the full activations of 3: the first 5
  // recompute. Per micro-batch of 4 x 32 tokens: a kept block 4 * 128 * (16 * 32 + 2 * 32 + 4)
  // bytes, a recomputing one 4 * 128 * 32.
  const std::string model = "--set model.n_layer=8 train.steps=4 train.eval_every=0 ";
  const int64_t keep = 4 * 128 * (16 * 32 + 2 * 32 + 4), out = 4 * 128 * 32;
  const int64_t budget = 3 * keep + 5 * out + 100;
  const std::string budgeted = model + "memory.activation_budget=" + std::to_string(budget);
  CommandResult all = Train("keep", model);
  CommandResult some = Train("redo", budgeted);
  ASSERT_EQ(all.exit_code, 0) << all.output;
  ASSERT_EQ(some.exit_code, 0) << some.output;
  EXPECT_NE(some.output.find("3 of 8 blocks keep their activations, 5 recompute them"),
            std::string::npos)
      << some.output;
  EXPECT_EQ(StepLosses("keep"), StepLosses("redo"));
  ExpectSameCheckpoint(tmp_ / "keep/checkpoints/step_00000004", tmp_ / "redo/checkpoints/step_00000004");

  // Offloading instead: two staging buffers of a block's inner activations (the kept size less
  // its output, as every tensor is a multiple of 64 bytes) come out of the budget, so one block
  // keeps and 7 offload.
  const std::string disk = " memory.disk_path=" + (tmp_ / "tier");
  CommandResult off = Train("off", budgeted + disk + " memory.activation_offload=always");
  ASSERT_EQ(off.exit_code, 0) << off.output;
  EXPECT_NE(off.output.find("1 of 8 blocks keep their activations, 7 offload them to " +
                            (tmp_ / "tier/activations")),
            std::string::npos)
      << off.output;
  EXPECT_EQ(StepLosses("keep"), StepLosses("off"));
  ExpectSameCheckpoint(tmp_ / "keep/checkpoints/step_00000004", tmp_ / "off/checkpoints/step_00000004");
  // "auto" decides from the measured disk and GEMM rates, which vary: either way the plan names
  // the disk's figure and the training is the same.
  CommandResult automatic = Train("auto", budgeted + disk);
  ASSERT_EQ(automatic.exit_code, 0) << automatic.output;
  EXPECT_NE(automatic.output.find("ms per block against"), std::string::npos) << automatic.output;
  EXPECT_EQ(StepLosses("keep"), StepLosses("auto"));

  for (const auto& [extra, key] :
       {std::make_pair(std::string("memory.activation_budget=lots"), "memory.activation_budget"),
        std::make_pair("memory.activation_offload=sometimes" + disk, "memory.activation_offload"),
        std::make_pair(std::string("memory.activation_offload=always"), "memory.disk_path")}) {
    CommandResult bad = Train("bad", model + extra);
    EXPECT_EQ(bad.exit_code, 2) << extra << "\n" << bad.output;
    EXPECT_NE(bad.output.find(key), std::string::npos) << extra << "\n" << bad.output;
  }
}

TEST_F(TrainerTest, PagedRunKilledDuringDiskWritesResumesToTheSameWeights) {
  // Paged states are written to the disk tier all the time; kill -9 lands during that. The tier
  // is scratch: a resume must start from the last checkpoint, never from the tier's leftovers,
  // and end exactly where an uninterrupted run ends.
  const std::string model =
      std::string(kPagedModel) + "train.steps=24 train.eval_every=0 checkpoint.every=6 "
      "optim.grad_clip=0 memory.disk_path=" + (tmp_ / "tier");
  CommandResult ram = Train("probe", std::string(kPagedModel) + "train.steps=1 train.eval_every=0");
  ASSERT_EQ(ram.exit_code, 0) << ram.output;
  const int64_t states =
      16 * CheckpointElements(tmp_ / "probe/checkpoints/step_00000001/model.safetensors");
  const std::string paged = model + " memory.host_budget=" + std::to_string(states / 4);
  CommandResult straight = Train("straight", paged);
  ASSERT_EQ(straight.exit_code, 0) << straight.output;

  const pid_t pid = StartTrain("killed", paged);
  ASSERT_GE(pid, 0);
  WaitForSteps("killed", 9, 180);
  kill(pid, SIGKILL);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  const size_t logged = StepLosses("killed").size();
  ASSERT_GE(logged, 9u);
  ASSERT_LT(logged, 24u) << "killed before the end";

  CommandResult resumed = Train("killed", paged + " --resume");
  ASSERT_EQ(resumed.exit_code, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("resumed from"), std::string::npos) << resumed.output;
  ExpectSameCheckpoint(tmp_ / "straight/checkpoints/step_00000024",
                       tmp_ / "killed/checkpoints/step_00000024");
}

TEST_F(TrainerTest, ResumeSkipsCorruptNewestCheckpoint) {
  CommandResult r = Train("run", "--set checkpoint.every=5 --stop-after 10");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  // Flip one byte in the newest checkpoint's weights.
  const std::string victim = tmp_ / "run/checkpoints/step_00000010/model.safetensors";
  std::string bytes = shoal::testing::ReadTextFile(victim);
  bytes[bytes.size() / 2] ^= 0x5a;
  shoal::testing::WriteTextFile(victim, bytes);

  CommandResult resumed = Train("run", "--set checkpoint.every=5 --resume --stop-after 1");
  ASSERT_EQ(resumed.exit_code, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("step_00000010"), std::string::npos) << resumed.output;
  EXPECT_NE(resumed.output.find("at step 5"), std::string::npos) << resumed.output;
}

TEST_F(TrainerTest, SigtermCheckpointsAndExits) {
  // Long enough that the signal lands mid-run.
  const pid_t pid = StartTrain("run", "train.steps=100000 train.eval_every=0");
  ASSERT_GE(pid, 0);
  // Wait until training has logged a few steps, then ask it to stop.
  ASSERT_GE(WaitForSteps("run", 3, 30), 3u);
  kill(pid, SIGTERM);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 128 + SIGTERM);
  CheckpointStore store(tmp_ / "run/checkpoints", 0);
  std::vector<std::string> skipped;
  auto latest = store.LoadLatest(&skipped);
  ASSERT_TRUE(latest.ok());
  ASSERT_TRUE(latest->has_value());
  EXPECT_GE((*latest)->step, 3);
  EXPECT_TRUE(skipped.empty());
}

}  // namespace
}  // namespace shoal::runtime
