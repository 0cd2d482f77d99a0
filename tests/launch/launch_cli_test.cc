// The `shoal` command line facing bad input: every bad config, flag, token file or checkpoint
// gets a message that names it and a non-zero exit, and nothing already written is damaged.
#include <gtest/gtest.h>

#include <string>

#include "tests/test_util.h"

namespace shoal {
namespace {

using testing::CommandResult;
using testing::ReadTextFile;
using testing::RunCommand;
using testing::TempDir;
using testing::WriteTextFile;

constexpr char kGoodConfig[] = R"([model]
n_layer = 1
n_head = 2
n_embd = 16
block_size = 16
vocab_size = 256

[train]
steps = 4
batch_size = 2
log_every = 1
eval_batches = 1
)";

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    WriteTextFile(tmp_ / "a.txt", testing::SyntheticText(20000));
    CommandResult r = Shoal("prepare-data --no-progress --input " + (tmp_ / "a.txt") + " --out " +
                            (tmp_ / "data"));
    ASSERT_EQ(r.exit_code, 0) << r.output;
    WriteTextFile(tmp_ / "good.toml", kGoodConfig);
  }

  static CommandResult Shoal(const std::string& args) {
    return RunCommand(std::string(SHOAL_BINARY) + " " + args);
  }

  // `shoal train` on the good config plus `extra`, with data and outputs in the temp dir.
  CommandResult Train(const std::string& extra, const std::string& config = "good.toml") {
    return Shoal("train --config " + (tmp_ / config) + " --set data.dir=" + (tmp_ / "data") +
                 " train.out_dir=" + (tmp_ / "run") + " " + extra);
  }

  void ExpectError(const CommandResult& r, const std::string& needle) {
    EXPECT_NE(r.exit_code, 0) << r.output;
    EXPECT_NE(r.output.find(needle), std::string::npos)
        << "expected the message to name '" << needle << "':\n" << r.output;
  }

  TempDir tmp_;
};

TEST_F(CliTest, EverySubcommandHasHelp) {
  for (const char* cmd : {"--help", "train --help", "prepare-data --help", "bench train --help"}) {
    CommandResult r = Shoal(cmd);
    EXPECT_EQ(r.exit_code, 0) << cmd << "\n" << r.output;
    EXPECT_NE(r.output.find("Usage"), std::string::npos) << cmd;
  }
  EXPECT_NE(Shoal("").exit_code, 0);
  EXPECT_NE(Shoal("no-such-command").exit_code, 0);
}

TEST_F(CliTest, GoodConfigTrains) {
  CommandResult r = Train("");
  EXPECT_EQ(r.exit_code, 0) << r.output;
}

TEST_F(CliTest, MissingConfigFile) {
  CommandResult r = Shoal("train --config " + (tmp_ / "nope.toml"));
  ExpectError(r, "nope.toml");
  EXPECT_EQ(r.exit_code, 2);
}

TEST_F(CliTest, UnknownKeyIsNamed) {
  WriteTextFile(tmp_ / "bad.toml", std::string(kGoodConfig) + "\n[optim]\nlearning_rate = 1\n");
  CommandResult r = Train("", "bad.toml");
  ExpectError(r, "optim.learning_rate");
  EXPECT_EQ(r.exit_code, 2);
}

TEST_F(CliTest, WrongTypeIsNamed) {
  ExpectError(Train("--set model.n_layer='\"four\"'"), "model.n_layer");
}

TEST_F(CliTest, HeadsMustDivideWidth) {
  CommandResult r = Train("--set model.n_head=3");
  ExpectError(r, "n_head");
  ExpectError(r, "16");
}

TEST_F(CliTest, MalformedOverride) {
  ExpectError(Train("--set nodot=1"), "nodot");
  ExpectError(Train("--set model.n_layer"), "model.n_layer");
}

TEST_F(CliTest, MissingDataIsNamed) {
  CommandResult r = Shoal("train --config " + (tmp_ / "good.toml") + " --set data.dir=" +
                          (tmp_ / "nodata") + " train.out_dir=" + (tmp_ / "run"));
  ExpectError(r, "nodata");
}

TEST_F(CliTest, TokenIdsBeyondVocabulary) {
  // Byte data (ids up to 255) against a 64-token model.
  ExpectError(Train("--set model.vocab_size=64 data.verify_checksums=false"), "vocab");
}

TEST_F(CliTest, BlockSizeLongerThanData) {
  ExpectError(Train("--set model.block_size=100000"), "block_size");
}

TEST_F(CliTest, TruncatedTokenFile) {
  std::string bytes = ReadTextFile(tmp_ / "data/train.bin");
  WriteTextFile(tmp_ / "data/train.bin", bytes.substr(0, 1001));  // odd: half a token
  ExpectError(Train("--set data.verify_checksums=false"), "train.bin");
  ExpectError(Train(""), "train.bin");
}

TEST_F(CliTest, EmptyTokenFile) {
  WriteTextFile(tmp_ / "data/val.bin", "");
  ExpectError(Train("--set data.verify_checksums=false"), "val.bin");
}

TEST_F(CliTest, PrepareDataBadInputs) {
  ExpectError(Shoal("prepare-data --input " + (tmp_ / "missing.txt") + " --out " + (tmp_ / "o")),
              "missing.txt");
  ExpectError(Shoal("prepare-data --input " + (tmp_ / "a.txt") + " --out " + (tmp_ / "o") +
                    " --val-fraction 0.9"),
              "val-fraction");
  ExpectError(Shoal("prepare-data --input " + (tmp_ / "a.txt") + " --out " + (tmp_ / "o") +
                    " --tokenizer nope"),
              "nope");
  WriteTextFile(tmp_ / "latin1.txt", "caf\xe9 au lait");
  ExpectError(Shoal("prepare-data --input " + (tmp_ / "latin1.txt") + " --out " + (tmp_ / "o")),
              "latin1.txt");
}

TEST_F(CliTest, FailedPrepareKeepsExistingData) {
  const std::string before = ReadTextFile(tmp_ / "data/train.bin");
  WriteTextFile(tmp_ / "latin1.txt", "caf\xe9");
  CommandResult r = Shoal("prepare-data --input " + (tmp_ / "a.txt") + " " +
                          (tmp_ / "latin1.txt") + " --out " + (tmp_ / "data"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_EQ(ReadTextFile(tmp_ / "data/train.bin"), before);
}

TEST_F(CliTest, ResumeFromAnotherModelIsRefused) {
  ASSERT_EQ(Train("").exit_code, 0);
  CommandResult r = Train("--resume --set model.n_embd=32");
  ExpectError(r, "another model");
  // The refused resume must not have touched the checkpoint.
  EXPECT_EQ(Train("--resume --set train.steps=6").exit_code, 0);
}

TEST_F(CliTest, ResumeWithOnlyCorruptCheckpointStartsFresh) {
  ASSERT_EQ(Train("").exit_code, 0);
  WriteTextFile(tmp_ / "run/checkpoints/step_00000004/manifest.json", "{ truncated");
  CommandResult r = Train("--resume");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("step_00000004"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("starting from step 0"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace shoal
