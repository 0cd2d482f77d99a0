// Tests for runtime/checkpoint with real directories (mkdtemp): round trips, pruning, and the
// faults a crash or a bad disk leaves behind (flipped bytes, truncated manifests, half-written
// temporaries), which must be skipped in favour of the previous good checkpoint.
#include "runtime/checkpoint.h"

#include <stdlib.h>
#include <unistd.h>

#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "common/file_util.h"
#include "common/sha256.h"

namespace shoal::runtime {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::SizeIs;

std::string Msg(const absl::Status& s) { return std::string(s.message()); }

CheckpointState MakeState(int64_t step) {
  CheckpointState s;
  s.step = step;
  s.config_toml = "[model]\nn_layer = 2\n";
  s.rng = {{"seed", 1337}, {"counter", step * 3}};
  s.data = {{"next_step", step}, {"train_sha256", "abc"}};
  s.extra = {{"loss", 2.5}};
  at::manual_seed(step);
  const at::Tensor w = at::randn({4, 3});
  s.model = {{"wte.weight", w},
             {"blocks.0.attn.qkv.weight", at::randn({3, 9}).to(at::kBFloat16)},
             {"blocks.0.ln.bias", at::full({3}, static_cast<double>(step))}};
  s.optimizer = {{"exp_avg.wte.weight", at::randn({4, 3})},
                 {"exp_avg_sq.wte.weight", at::rand({4, 3})},
                 {"step", at::scalar_tensor(step, at::kLong)}};
  return s;
}

// Looks `name` up in a NamedTensors (Load returns them sorted by name).
const at::Tensor* Find(const NamedTensors& tensors, const std::string& name) {
  for (const auto& [n, t] : tensors) {
    if (n == name) return &t;
  }
  return nullptr;
}

void ExpectSameTensors(const NamedTensors& expected, const NamedTensors& actual) {
  ASSERT_EQ(expected.size(), actual.size());
  for (const auto& [name, t] : expected) {
    const at::Tensor* back = Find(actual, name);
    ASSERT_NE(back, nullptr) << name;
    EXPECT_EQ(back->scalar_type(), t.scalar_type()) << name;
    EXPECT_TRUE(at::equal(*back, t)) << name;
  }
}

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/shoal_checkpoint_test_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    tmp_ = tmpl;
    root_ = tmp_ + "/ckpt";
  }
  void TearDown() override { ASSERT_TRUE(RemoveAll(tmp_).ok()); }

  std::string SaveOrDie(CheckpointStore& store, int64_t step) {
    absl::StatusOr<std::string> dir = store.Save(MakeState(step));
    EXPECT_TRUE(dir.ok()) << dir.status();
    return dir.ok() ? *dir : "";
  }

  std::string tmp_;
  std::string root_;
};

TEST_F(CheckpointTest, SaveLoadRoundTrip) {
  CheckpointStore store(root_, 3);
  const CheckpointState original = MakeState(10);
  absl::StatusOr<std::string> dir = store.Save(original);
  ASSERT_TRUE(dir.ok()) << dir.status();
  EXPECT_EQ(*dir, root_ + "/step_00000010");

  absl::StatusOr<CheckpointState> loaded = CheckpointStore::Load(*dir);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->step, 10);
  EXPECT_EQ(loaded->config_toml, original.config_toml);
  EXPECT_EQ(loaded->rng, original.rng);
  EXPECT_EQ(loaded->data, original.data);
  EXPECT_EQ(loaded->extra, original.extra);
  ExpectSameTensors(original.model, loaded->model);
  ExpectSameTensors(original.optimizer, loaded->optimizer);
}

TEST_F(CheckpointTest, ManifestListsFilesWithHashAndSize) {
  CheckpointStore store(root_, 0);
  const std::string dir = SaveOrDie(store, 3);
  absl::StatusOr<std::string> text = ReadFileToString(dir + "/manifest.json");
  ASSERT_TRUE(text.ok());
  const nlohmann::json m = nlohmann::json::parse(*text);
  EXPECT_EQ(m["format"], "shoal-checkpoint-v1");
  EXPECT_EQ(m["step"], 3);
  EXPECT_EQ(m["config"], "[model]\nn_layer = 2\n");
  for (const std::string name : {"model.safetensors", "optimizer.safetensors"}) {
    absl::StatusOr<std::string> bytes = ReadFileToString(dir + "/" + name);
    ASSERT_TRUE(bytes.ok());
    EXPECT_EQ(m["files"][name]["bytes"], bytes->size()) << name;
    EXPECT_EQ(m["files"][name]["sha256"], Sha256Hex(bytes->data(), bytes->size())) << name;
  }
  // Nothing but the three files, and no temporaries left in the root.
  EXPECT_THAT(*ListDirectory(dir),
              ElementsAre("manifest.json", "model.safetensors", "optimizer.safetensors"));
  EXPECT_THAT(*ListDirectory(root_), ElementsAre("step_00000003"));
}

TEST_F(CheckpointTest, KeepPrunesOldest) {
  CheckpointStore store(root_, 2);
  for (int64_t step : {1, 2, 3, 4}) SaveOrDie(store, step);
  absl::StatusOr<std::vector<std::string>> dirs = store.ListStepDirs();
  ASSERT_TRUE(dirs.ok());
  EXPECT_THAT(*dirs, ElementsAre(root_ + "/step_00000003", root_ + "/step_00000004"));

  CheckpointStore keep_all(root_, 0);
  for (int64_t step : {5, 6, 7}) SaveOrDie(keep_all, step);
  EXPECT_THAT(*keep_all.ListStepDirs(), SizeIs(5));
}

TEST_F(CheckpointTest, SavingAnOlderStepNeverPrunesTheNewCheckpoint) {
  CheckpointStore store(root_, 1);
  SaveOrDie(store, 10);
  const std::string dir = SaveOrDie(store, 5);  // e.g. after resuming from an older step
  EXPECT_TRUE(IsDirectory(dir));
}

TEST_F(CheckpointTest, SameStepIsReplaced) {
  CheckpointStore store(root_, 3);
  SaveOrDie(store, 8);
  CheckpointState second = MakeState(8);
  second.extra = {{"loss", 1.0}};
  second.model[0].second = at::zeros({4, 3});
  ASSERT_TRUE(store.Save(second).ok());
  absl::StatusOr<std::optional<CheckpointState>> latest = store.LoadLatest(nullptr);
  ASSERT_TRUE(latest.ok()) << latest.status();
  ASSERT_TRUE(latest->has_value());
  EXPECT_EQ((*latest)->extra, second.extra);
  ExpectSameTensors(second.model, (*latest)->model);
  EXPECT_THAT(*ListDirectory(root_), ElementsAre("step_00000008"));
}

TEST_F(CheckpointTest, EmptyOrMissingRootHasNoCheckpoint) {
  CheckpointStore store(root_, 3);
  std::vector<std::string> skipped;
  absl::StatusOr<std::optional<CheckpointState>> latest = store.LoadLatest(&skipped);
  ASSERT_TRUE(latest.ok()) << latest.status();
  EXPECT_FALSE(latest->has_value());
  EXPECT_TRUE(skipped.empty());
  EXPECT_EQ(CheckpointStore::Load(root_ + "/step_00000001").status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(CheckpointTest, ListStepDirsIgnoresOtherNames) {
  CheckpointStore store(root_, 0);
  SaveOrDie(store, 2);
  ASSERT_TRUE(MakeDirs(root_ + "/step_1").ok());
  ASSERT_TRUE(MakeDirs(root_ + "/step_000000001").ok());
  ASSERT_TRUE(MakeDirs(root_ + "/step_0000000a").ok());
  ASSERT_TRUE(MakeDirs(root_ + "/notes").ok());
  ASSERT_TRUE(WriteFileSynced(root_ + "/step_00000009", "a file, not a directory").ok());
  EXPECT_THAT(*store.ListStepDirs(), ElementsAre(root_ + "/step_00000002"));
}

TEST_F(CheckpointTest, FlippedByteIsSkippedForThePreviousCheckpoint) {
  CheckpointStore store(root_, 0);
  SaveOrDie(store, 1);
  const std::string newest = SaveOrDie(store, 2);
  const std::string model = newest + "/model.safetensors";
  std::string bytes = *ReadFileToString(model);
  bytes[bytes.size() - 5] ^= 0x01;  // one bit of one weight
  ASSERT_TRUE(WriteFileSynced(model, bytes).ok());

  EXPECT_EQ(CheckpointStore::Load(newest).status().code(), absl::StatusCode::kDataLoss);
  std::vector<std::string> skipped;
  absl::StatusOr<std::optional<CheckpointState>> latest = store.LoadLatest(&skipped);
  ASSERT_TRUE(latest.ok()) << latest.status();
  ASSERT_TRUE(latest->has_value());
  EXPECT_EQ((*latest)->step, 1);
  ExpectSameTensors(MakeState(1).model, (*latest)->model);
  ASSERT_THAT(skipped, SizeIs(1));
  EXPECT_THAT(skipped[0], HasSubstr(newest + ": "));
  EXPECT_THAT(skipped[0], HasSubstr("model.safetensors"));
  EXPECT_THAT(skipped[0], HasSubstr("sha256"));
}

TEST_F(CheckpointTest, TruncatedFilesAreDataLoss) {
  CheckpointStore store(root_, 0);
  SaveOrDie(store, 1);
  const std::string newest = SaveOrDie(store, 2);
  const std::string optimizer = newest + "/optimizer.safetensors";
  std::string bytes = *ReadFileToString(optimizer);
  ASSERT_TRUE(WriteFileSynced(optimizer, bytes.substr(0, bytes.size() / 2)).ok());
  absl::StatusOr<CheckpointState> loaded = CheckpointStore::Load(newest);
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(Msg(loaded.status()), HasSubstr("optimizer.safetensors"));

  std::vector<std::string> skipped;
  absl::StatusOr<std::optional<CheckpointState>> latest = store.LoadLatest(&skipped);
  ASSERT_TRUE(latest.ok() && latest->has_value());
  EXPECT_EQ((*latest)->step, 1);
  EXPECT_THAT(skipped, SizeIs(1));
}

TEST_F(CheckpointTest, TruncatedOrIncompleteManifestIsDataLoss) {
  CheckpointStore store(root_, 0);
  SaveOrDie(store, 1);
  const std::string newest = SaveOrDie(store, 2);
  const std::string manifest = newest + "/manifest.json";
  const std::string text = *ReadFileToString(manifest);

  ASSERT_TRUE(WriteFileSynced(manifest, text.substr(0, text.size() / 2)).ok());
  absl::StatusOr<CheckpointState> loaded = CheckpointStore::Load(newest);
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(Msg(loaded.status()), HasSubstr("manifest.json"));

  std::vector<std::string> skipped;
  absl::StatusOr<std::optional<CheckpointState>> latest = store.LoadLatest(&skipped);
  ASSERT_TRUE(latest.ok() && latest->has_value());
  EXPECT_EQ((*latest)->step, 1);
  ASSERT_THAT(skipped, SizeIs(1));
  EXPECT_THAT(skipped[0], HasSubstr("manifest.json"));

  // Valid JSON with a field missing, or a file entry dropped.
  for (const char* field : {"format", "step", "config", "rng", "data", "extra", "files"}) {
    nlohmann::json m = nlohmann::json::parse(text);
    m.erase(field);
    ASSERT_TRUE(WriteFileSynced(manifest, m.dump()).ok());
    loaded = CheckpointStore::Load(newest);
    EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss) << field;
    EXPECT_THAT(Msg(loaded.status()), HasSubstr(field));
  }
  nlohmann::json m = nlohmann::json::parse(text);
  m["files"].erase("optimizer.safetensors");
  ASSERT_TRUE(WriteFileSynced(manifest, m.dump()).ok());
  EXPECT_EQ(CheckpointStore::Load(newest).status().code(), absl::StatusCode::kDataLoss);

  // A manifest whose step disagrees with the directory name.
  m = nlohmann::json::parse(text);
  m["step"] = 3;
  ASSERT_TRUE(WriteFileSynced(manifest, m.dump()).ok());
  EXPECT_EQ(CheckpointStore::Load(newest).status().code(), absl::StatusCode::kDataLoss);

  ASSERT_TRUE(RemoveAll(manifest).ok());
  EXPECT_EQ(CheckpointStore::Load(newest).status().code(), absl::StatusCode::kDataLoss);
}

TEST_F(CheckpointTest, LeftoverTmpDirIsIgnoredAndCleared) {
  CheckpointStore store(root_, 0);
  SaveOrDie(store, 1);
  // A complete-looking checkpoint of a newer step that never got renamed into place. The pid
  // is past Linux's pid_max, so no live process owns it.
  const std::string leftover = root_ + "/.tmp-step_00000009-99999999";
  ASSERT_TRUE(MakeDirs(leftover).ok());
  CheckpointStore other(tmp_ + "/other", 0);
  const std::string complete = SaveOrDie(other, 9);
  for (const char* name : {"model.safetensors", "optimizer.safetensors", "manifest.json"}) {
    ASSERT_TRUE(WriteFileSynced(leftover + "/" + name,
                                *ReadFileToString(complete + "/" + name)).ok());
  }

  EXPECT_THAT(*store.ListStepDirs(), ElementsAre(root_ + "/step_00000001"));
  std::vector<std::string> skipped;
  absl::StatusOr<std::optional<CheckpointState>> latest = store.LoadLatest(&skipped);
  ASSERT_TRUE(latest.ok() && latest->has_value());
  EXPECT_EQ((*latest)->step, 1);
  EXPECT_TRUE(skipped.empty());

  // The next Save clears the stale temporary.
  SaveOrDie(store, 2);
  EXPECT_FALSE(PathExists(leftover));
  EXPECT_THAT(*ListDirectory(root_), ElementsAre("step_00000001", "step_00000002"));
}

TEST_F(CheckpointTest, CrashMidSaveLeavesPreviousIntact) {
  CheckpointStore store(root_, 1);
  SaveOrDie(store, 4);
  // What a writer killed half-way through step 5 leaves: a temporary with a partial model
  // file and no manifest, under this process's pid (as if an earlier Save of ours failed).
  const std::string partial = root_ + "/.tmp-step_00000005-" + std::to_string(::getpid());
  ASSERT_TRUE(MakeDirs(partial).ok());
  ASSERT_TRUE(WriteFileSynced(partial + "/model.safetensors", std::string("\x40\x00\x00", 3)).ok());

  std::vector<std::string> skipped;
  absl::StatusOr<std::optional<CheckpointState>> latest = store.LoadLatest(&skipped);
  ASSERT_TRUE(latest.ok() && latest->has_value());
  EXPECT_EQ((*latest)->step, 4);
  ExpectSameTensors(MakeState(4).model, (*latest)->model);
  ExpectSameTensors(MakeState(4).optimizer, (*latest)->optimizer);
  EXPECT_TRUE(skipped.empty());

  // Retrying the save succeeds, replaces the partial temporary and prunes step 4 (keep = 1).
  SaveOrDie(store, 5);
  EXPECT_THAT(*ListDirectory(root_), ElementsAre("step_00000005"));
  latest = store.LoadLatest(&skipped);
  ASSERT_TRUE(latest.ok() && latest->has_value());
  EXPECT_EQ((*latest)->step, 5);
}

TEST_F(CheckpointTest, AllInvalidGivesNulloptAndReasons) {
  CheckpointStore store(root_, 0);
  const std::string a = SaveOrDie(store, 1);
  const std::string b = SaveOrDie(store, 2);
  ASSERT_TRUE(RemoveAll(a + "/model.safetensors").ok());
  ASSERT_TRUE(WriteFileSynced(b + "/manifest.json", "{").ok());
  std::vector<std::string> skipped;
  absl::StatusOr<std::optional<CheckpointState>> latest = store.LoadLatest(&skipped);
  ASSERT_TRUE(latest.ok()) << latest.status();
  EXPECT_FALSE(latest->has_value());
  ASSERT_THAT(skipped, SizeIs(2));
  EXPECT_THAT(skipped[0], HasSubstr(b + ": "));  // newest first
  EXPECT_THAT(skipped[1], HasSubstr(a + ": "));
  EXPECT_THAT(skipped[1], HasSubstr("model.safetensors"));
}

TEST_F(CheckpointTest, SaveRejectsBadSteps) {
  CheckpointStore store(root_, 0);
  EXPECT_EQ(store.Save(MakeState(-1)).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store.Save(MakeState(100000000)).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace shoal::runtime
