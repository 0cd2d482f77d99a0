// prepare-data on real files in a temporary folder. Outputs are checked against references built
// here independently of the code under test: the expected text is assembled by hand, train.bin /
// val.bin are decoded byte by byte as little-endian uint16, and checksums are recomputed from the
// files on disk.
#include "runtime/prepare_data.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <cmath>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/file_util.h"
#include "common/sha256.h"
#include "runtime/token_file.h"

namespace shoal::runtime {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

class PrepareDataTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* tmp = std::getenv("TMPDIR");
    std::string tmpl = std::string(tmp != nullptr && *tmp ? tmp : "/tmp") + "/shoal_prep_XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    root_ = tmpl;
  }
  void TearDown() override { ASSERT_TRUE(RemoveAll(root_).ok()); }

  // Creates `rel` (and its parent folders) under the temp root with `contents`; returns its path.
  std::string Write(const std::string& rel, const std::string& contents) {
    const std::string path = root_ + "/" + rel;
    EXPECT_TRUE(MakeDirs(DirName(path)).ok());
    std::ofstream out(path, std::ios::binary);
    out << contents;
    EXPECT_TRUE(out.good());
    return path;
  }

  static std::string ReadBytes(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }

  // Decodes a byte-tokenizer token file: every little-endian uint16 must be a byte value.
  static std::string DecodeByteTokens(const std::string& path) {
    const std::string raw = ReadBytes(path);
    EXPECT_EQ(raw.size() % 2, 0u) << path;
    std::string text;
    for (size_t i = 0; i + 1 < raw.size(); i += 2) {
      const unsigned lo = static_cast<unsigned char>(raw[i]);
      const unsigned hi = static_cast<unsigned char>(raw[i + 1]);
      const unsigned id = lo | (hi << 8);
      EXPECT_LT(id, 256u) << path << " token " << i / 2;
      text.push_back(static_cast<char>(id));
    }
    return text;
  }

  PrepareDataOptions Options(std::vector<std::string> inputs, const std::string& out_rel,
                             double val_fraction = 0.1) {
    PrepareDataOptions o;
    o.inputs = std::move(inputs);
    o.out_dir = root_ + "/" + out_rel;
    o.val_fraction = val_fraction;
    o.progress = false;
    return o;
  }

  std::string root_;
};

TEST_F(PrepareDataTest, WritesSplitsThatDecodeToTheJoinedInputs) {
  // Folder walk order is sorted *path* order: "a.txt" < "a/x.txt" because '.' < '/'.
  Write("corpus/a/x.txt", "second doc\n");
  Write("corpus/a.txt", "first doc");
  Write("corpus/b.txt", "th\xC3\xAFrd \xE4\xB8\x96\xE7\x95\x8C");
  Write("corpus/.hidden.txt", "must not appear");
  Write("corpus/.git/HEAD", "must not appear either");
  Write("corpus/empty.txt", "");
  const std::string extra = Write("extra.txt", "explicit file last");

  PrepareDataOptions o = Options({root_ + "/corpus", extra}, "out", 0.25);
  o.progress = true;  // exercises the progress bar (output goes to stderr)
  ASSERT_TRUE(PrepareData(o).ok());

  const std::string expected =
      "first doc\n\nsecond doc\n\n\nth\xC3\xAFrd \xE4\xB8\x96\xE7\x95\x8C\n\nexplicit file last";
  const std::string train = DecodeByteTokens(o.out_dir + "/train.bin");
  const std::string val = DecodeByteTokens(o.out_dir + "/val.bin");
  EXPECT_EQ(train + val, expected);
  const size_t n = expected.size();
  const size_t n_val = n / 4;  // floor(n * 0.25)
  EXPECT_EQ(val.size(), n_val);
  EXPECT_EQ(train.size(), n - n_val);

  auto meta_text = ReadFileToString(o.out_dir + "/meta.json");
  ASSERT_TRUE(meta_text.ok());
  const nlohmann::json meta = nlohmann::json::parse(*meta_text);
  EXPECT_EQ(meta["format"], "shoal-tokens-v1");
  EXPECT_EQ(meta["tokenizer"], "byte");
  EXPECT_EQ(meta["vocab_size"], 256);
  EXPECT_EQ(meta["dtype"], "uint16");
  EXPECT_EQ(meta["train_tokens"], n - n_val);
  EXPECT_EQ(meta["val_tokens"], n_val);
  EXPECT_EQ(meta["train_sha256"], *Sha256File(o.out_dir + "/train.bin"));
  EXPECT_EQ(meta["val_sha256"], *Sha256File(o.out_dir + "/val.bin"));
  EXPECT_EQ(meta["sources"].get<std::vector<std::string>>(),
            (std::vector<std::string>{root_ + "/corpus/a.txt", root_ + "/corpus/a/x.txt",
                                      root_ + "/corpus/b.txt", extra}));

  // Nothing but the three outputs: no temporaries left behind.
  auto names = ListDirectory(o.out_dir);
  ASSERT_TRUE(names.ok());
  EXPECT_THAT(*names, ElementsAre("meta.json", "train.bin", "val.bin"));
}

TEST_F(PrepareDataTest, OutputOpensAsTokenDatasetWithChecksums) {
  std::string text;
  for (int i = 0; i < 200; ++i) text += "line " + std::to_string(i) + "\n";
  const std::string in = Write("in.txt", text);
  PrepareDataOptions o = Options({in}, "data", 0.1);
  ASSERT_TRUE(PrepareData(o).ok());
  auto ds = OpenTokenDataset(o.out_dir, 256, /*block_size=*/16, /*verify_checksums=*/true);
  ASSERT_TRUE(ds.ok()) << ds.status();
  EXPECT_EQ(ds->train->size() + ds->val->size(), text.size());
  EXPECT_EQ(ds->val->size(), static_cast<size_t>(std::floor(text.size() * 0.1)));
}

TEST_F(PrepareDataTest, RerunReplacesOutputsAndSkipsOutDirInsideInput) {
  Write("corpus/doc.txt", "version one of the corpus text");
  PrepareDataOptions o = Options({root_ + "/corpus"}, "corpus/out", 0.5);
  ASSERT_TRUE(PrepareData(o).ok());
  // The second run walks corpus/ again, which now holds out/; its .bin files must not be read.
  Write("corpus/doc.txt", "version TWO");
  ASSERT_TRUE(PrepareData(o).ok());
  EXPECT_EQ(DecodeByteTokens(o.out_dir + "/train.bin") + DecodeByteTokens(o.out_dir + "/val.bin"),
            "version TWO");
}

TEST_F(PrepareDataTest, MissingInputIsInvalidArgumentNamingIt) {
  const std::string missing = root_ + "/no/such/file.txt";
  absl::Status s = PrepareData(Options({missing}, "out"));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr(missing));
  EXPECT_FALSE(PathExists(root_ + "/out"));
}

TEST_F(PrepareDataTest, NonUtf8FileIsInvalidArgumentWithFileAndOffset) {
  Write("corpus/a.txt", "all good here");
  struct Case {
    std::string contents;
    size_t offset;
  };
  const std::vector<Case> cases = {
      {"abc\xFF tail", 3},                // never valid in UTF-8
      {"ok \xC3\xA9 then \xC0\xAF", 11},  // overlong encoding of '/'
      {"x\xED\xA0\x80y", 1},              // UTF-16 surrogate
      {"\xF4\x90\x80\x80", 0},            // above U+10FFFF
      {"caf\xC3", 3},                     // truncated at end of file
      {"\xE2\x82x", 0},                   // bad continuation byte
      {"latin-1 caf\xE9!", 11},           // a Latin-1 file
  };
  for (const Case& c : cases) {
    const std::string bad = Write("corpus/b.txt", c.contents);
    absl::Status s = PrepareData(Options({root_ + "/corpus"}, "out"));
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.offset;
    EXPECT_THAT(s.message(), HasSubstr(bad));
    EXPECT_THAT(s.message(), HasSubstr("offset " + std::to_string(c.offset)));
  }
}

TEST_F(PrepareDataTest, ValFractionOutOfRangeIsInvalidArgument) {
  const std::string in = Write("in.txt", "some text that is long enough");
  for (double f : {0.0, -0.1, 0.51, 1.0, std::numeric_limits<double>::quiet_NaN()}) {
    absl::Status s = PrepareData(Options({in}, "out", f));
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << f;
    EXPECT_THAT(s.message(), HasSubstr("--val-fraction")) << f;
  }
  EXPECT_TRUE(PrepareData(Options({in}, "out", 0.5)).ok());
}

TEST_F(PrepareDataTest, EmptyInputIsAnError) {
  Write("empty/.keep", "hidden, skipped");
  Write("empty/zero.txt", "");
  absl::Status s = PrepareData(Options({root_ + "/empty"}, "out"));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("no text"));
}

TEST_F(PrepareDataTest, TooFewTokensForTwoSplitsIsAnError) {
  const std::string in = Write("tiny.txt", "abc");  // floor(3 * 0.1) = 0 val tokens
  absl::Status s = PrepareData(Options({in}, "out", 0.1));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("val split empty"));
}

TEST_F(PrepareDataTest, UnknownTokenizerIsInvalidArgument) {
  const std::string in = Write("in.txt", "text");
  PrepareDataOptions o = Options({in}, "out");
  o.tokenizer = "gpt2";
  EXPECT_EQ(PrepareData(o).code(), absl::StatusCode::kInvalidArgument);
  o.tokenizer = "wordpiece";
  EXPECT_EQ(PrepareData(o).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(PrepareDataTest, FailedRunLeavesPreviousOutputsUntouched) {
  Write("corpus/a.txt", "the first, good corpus");
  PrepareDataOptions o = Options({root_ + "/corpus"}, "out", 0.5);
  ASSERT_TRUE(PrepareData(o).ok());
  const std::string train = ReadBytes(o.out_dir + "/train.bin");
  const std::string val = ReadBytes(o.out_dir + "/val.bin");
  const std::string meta = ReadBytes(o.out_dir + "/meta.json");

  Write("corpus/b.txt", "bad \xFF byte");
  EXPECT_EQ(PrepareData(o).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ReadBytes(o.out_dir + "/train.bin"), train);
  EXPECT_EQ(ReadBytes(o.out_dir + "/val.bin"), val);
  EXPECT_EQ(ReadBytes(o.out_dir + "/meta.json"), meta);
}

}  // namespace
}  // namespace shoal::runtime
