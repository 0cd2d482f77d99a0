// TokenFile / OpenTokenDataset on real files. Token files are written here byte by byte
// (little-endian) and meta.json by hand, so the reader is checked against the on-disk format
// rather than against prepare-data's writer.
#include "runtime/token_file.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>

#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/file_util.h"
#include "common/sha256.h"

namespace shoal::runtime {
namespace {

using ::testing::HasSubstr;

class TokenFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* tmp = std::getenv("TMPDIR");
    std::string tmpl = std::string(tmp != nullptr && *tmp ? tmp : "/tmp") + "/shoal_tok_XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { ASSERT_TRUE(RemoveAll(dir_).ok()); }

  std::string WriteRaw(const std::string& name, const std::string& bytes) {
    const std::string path = dir_ + "/" + name;
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << bytes;
    EXPECT_TRUE(out.good());
    return path;
  }

  std::string WriteTokens(const std::string& name, const std::vector<unsigned>& ids) {
    std::string bytes;
    for (unsigned id : ids) {
      bytes.push_back(static_cast<char>(id & 0xFF));
      bytes.push_back(static_cast<char>(id >> 8));
    }
    return WriteRaw(name, bytes);
  }

  static std::vector<unsigned> Iota(unsigned n, unsigned mod) {
    std::vector<unsigned> v(n);
    for (unsigned i = 0; i < n; ++i) v[i] = (i * 7 + 3) % mod;
    return v;
  }

  // A consistent dataset: train.bin (100 tokens), val.bin (20 tokens) and a meta.json matching.
  void WriteDataset() {
    WriteTokens("train.bin", Iota(100, 256));
    WriteTokens("val.bin", Iota(20, 256));
    WriteMeta(meta_json());
  }

  nlohmann::json meta_json() {
    return {{"format", "shoal-tokens-v1"},
            {"tokenizer", "byte"},
            {"vocab_size", 256},
            {"dtype", "uint16"},
            {"train_tokens", 100},
            {"val_tokens", 20},
            {"train_sha256", *Sha256File(dir_ + "/train.bin")},
            {"val_sha256", *Sha256File(dir_ + "/val.bin")},
            {"sources", {"x.txt"}}};
  }

  void WriteMeta(const nlohmann::json& meta) { WriteRaw("meta.json", meta.dump(2)); }

  std::string dir_;
};

TEST_F(TokenFileTest, OpenReadsLittleEndianIds) {
  const std::string path = WriteTokens("t.bin", {0, 1, 255, 256, 0x1234, 65535});
  auto f = TokenFile::Open(path, 65536);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->path(), path);
  ASSERT_EQ((*f)->size(), 6u);
  const std::vector<uint16_t> got((*f)->data(), (*f)->data() + (*f)->size());
  EXPECT_EQ(got, (std::vector<uint16_t>{0, 1, 255, 256, 0x1234, 65535}));
}

TEST_F(TokenFileTest, MissingFileIsNotFound) {
  auto f = TokenFile::Open(dir_ + "/nope.bin", 256);
  EXPECT_EQ(f.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(f.status().message(), HasSubstr(dir_ + "/nope.bin"));
}

TEST_F(TokenFileTest, EmptyFileIsDataLoss) {
  const std::string path = WriteRaw("empty.bin", "");
  auto f = TokenFile::Open(path, 256);
  EXPECT_EQ(f.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(f.status().message(), HasSubstr(path));
  EXPECT_THAT(f.status().message(), HasSubstr("empty"));
}

TEST_F(TokenFileTest, OddSizeIsDataLoss) {
  const std::string path = WriteRaw("odd.bin", std::string("\x01\x00\x02", 3));
  auto f = TokenFile::Open(path, 256);
  EXPECT_EQ(f.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(f.status().message(), HasSubstr(path));
  EXPECT_THAT(f.status().message(), HasSubstr("odd size"));
}

TEST_F(TokenFileTest, IdOutOfVocabIsDataLossWithFirstPositionAndValue) {
  const std::string path = WriteTokens("big.bin", {1, 2, 255, 300, 5, 400});
  auto f = TokenFile::Open(path, 256);
  EXPECT_EQ(f.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(f.status().message(), HasSubstr(path));
  EXPECT_THAT(f.status().message(), HasSubstr("token 3 "));
  EXPECT_THAT(f.status().message(), HasSubstr("id 300"));
  // The same file is fine for a larger vocabulary.
  EXPECT_TRUE(TokenFile::Open(path, 50257).ok());
  EXPECT_EQ(TokenFile::Open(path, 400).status().code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(TokenFile::Open(path, 401).ok());
}

TEST_F(TokenFileTest, DatasetOpensWithMetaAndChecksums) {
  WriteDataset();
  auto ds = OpenTokenDataset(dir_, 256, /*block_size=*/19, /*verify_checksums=*/true);
  ASSERT_TRUE(ds.ok()) << ds.status();
  EXPECT_EQ(ds->train->size(), 100u);
  EXPECT_EQ(ds->val->size(), 20u);
  EXPECT_EQ(ds->train->data()[1], 10);  // (1 * 7 + 3) % 256
  EXPECT_EQ(ds->val->path(), dir_ + "/val.bin");
  // A model with a larger vocabulary than the data's may use it.
  EXPECT_TRUE(OpenTokenDataset(dir_, 50304, 19, true).ok());
}

TEST_F(TokenFileTest, DatasetWithoutMetaOpens) {
  WriteTokens("train.bin", Iota(50, 256));
  WriteTokens("val.bin", Iota(10, 256));
  auto ds = OpenTokenDataset(dir_, 256, 8, true);
  ASSERT_TRUE(ds.ok()) << ds.status();
  EXPECT_EQ(ds->train->size(), 50u);
}

TEST_F(TokenFileTest, DatasetMissingValIsNotFound) {
  WriteTokens("train.bin", Iota(50, 256));
  auto ds = OpenTokenDataset(dir_, 256, 8, false);
  EXPECT_EQ(ds.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(ds.status().message(), HasSubstr(dir_ + "/val.bin"));
}

TEST_F(TokenFileTest, DatasetBadIdNamesTheFile) {
  WriteTokens("train.bin", Iota(50, 256));
  WriteTokens("val.bin", {1, 2, 3, 256, 4, 5, 6, 7, 8, 9});
  auto ds = OpenTokenDataset(dir_, 256, 4, false);
  EXPECT_EQ(ds.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(ds.status().message(), HasSubstr(dir_ + "/val.bin"));
}

TEST_F(TokenFileTest, MetaThatIsNotJsonIsDataLoss) {
  WriteDataset();
  WriteRaw("meta.json", "{\"format\": \"shoal-tokens-v1\", truncated");
  auto ds = OpenTokenDataset(dir_, 256, 8, false);
  EXPECT_EQ(ds.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(ds.status().message(), HasSubstr(dir_ + "/meta.json"));
}

TEST_F(TokenFileTest, MetaMissingFieldIsDataLoss) {
  WriteDataset();
  nlohmann::json meta = meta_json();
  meta.erase("val_tokens");
  WriteMeta(meta);
  auto ds = OpenTokenDataset(dir_, 256, 8, false);
  EXPECT_EQ(ds.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(ds.status().message(), HasSubstr(dir_ + "/meta.json"));
  EXPECT_THAT(ds.status().message(), HasSubstr("val_tokens"));
}

TEST_F(TokenFileTest, MetaVocabLargerThanModelIsInvalidArgument) {
  WriteDataset();
  nlohmann::json meta = meta_json();
  meta["vocab_size"] = 50257;
  WriteMeta(meta);
  auto ds = OpenTokenDataset(dir_, 256, 8, false);
  EXPECT_EQ(ds.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(ds.status().message(), HasSubstr(dir_ + "/meta.json"));
  EXPECT_THAT(ds.status().message(), HasSubstr("50257"));
}

TEST_F(TokenFileTest, TokenCountMismatchIsDataLoss) {
  WriteDataset();
  WriteTokens("train.bin", Iota(99, 256));  // meta.json still says 100
  auto ds = OpenTokenDataset(dir_, 256, 8, false);
  EXPECT_EQ(ds.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(ds.status().message(), HasSubstr(dir_ + "/train.bin"));
  EXPECT_THAT(ds.status().message(), HasSubstr("99"));
  EXPECT_THAT(ds.status().message(), HasSubstr("100"));
}

TEST_F(TokenFileTest, ChecksumMismatchIsDataLossOnlyWhenVerifying) {
  WriteDataset();
  std::vector<unsigned> val = Iota(20, 256);
  val[7] ^= 1;  // same size, one flipped bit
  WriteTokens("val.bin", val);
  auto ds = OpenTokenDataset(dir_, 256, 8, /*verify_checksums=*/true);
  EXPECT_EQ(ds.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(ds.status().message(), HasSubstr(dir_ + "/val.bin"));
  EXPECT_THAT(ds.status().message(), HasSubstr("sha256"));
  EXPECT_TRUE(OpenTokenDataset(dir_, 256, 8, /*verify_checksums=*/false).ok());
}

TEST_F(TokenFileTest, BlockSizeNotShorterThanDataIsInvalidArgument) {
  WriteDataset();  // val.bin holds 20 tokens
  EXPECT_TRUE(OpenTokenDataset(dir_, 256, 19, true).ok());
  for (int block_size : {20, 64}) {
    auto ds = OpenTokenDataset(dir_, 256, block_size, true);
    EXPECT_EQ(ds.status().code(), absl::StatusCode::kInvalidArgument) << block_size;
    EXPECT_THAT(ds.status().message(), HasSubstr("model.block_size"));
    EXPECT_THAT(ds.status().message(), HasSubstr(dir_ + "/val.bin"));
  }
  auto ds = OpenTokenDataset(dir_, 256, 100, true);
  EXPECT_EQ(ds.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(ds.status().message(), HasSubstr(dir_ + "/train.bin"));
}

}  // namespace
}  // namespace shoal::runtime
