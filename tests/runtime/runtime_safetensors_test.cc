// Tests for runtime/safetensors against the format itself, not against our own writer: files
// are built byte by byte here (header JSON + raw little-endian values) and read back, and the
// writer's bytes are taken apart here with nlohmann::json. Real files in a mkdtemp folder.
#include "runtime/safetensors.h"

#include <stdlib.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "common/file_util.h"

namespace shoal::runtime {
namespace {

using ::testing::HasSubstr;

std::string Msg(const absl::Status& s) { return std::string(s.message()); }

std::string U64Le(uint64_t v) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  return out;
}

template <typename T>
std::string RawBytes(const std::vector<T>& values) {
  return std::string(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(T));
}

// A safetensors file from its parts: length prefix, header text, data.
std::string MakeFile(const std::string& header, const std::string& data) {
  return U64Le(header.size()) + header + data;
}

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/shoal_safetensors_test_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { ASSERT_TRUE(RemoveAll(dir_).ok()); }

  std::string Write(const std::string& name, const std::string& bytes) {
    const std::string path = dir_ + "/" + name;
    EXPECT_TRUE(WriteFileSynced(path, bytes).ok());
    return path;
  }

  // Reads a hand-made file and expects kDataLoss naming it, with `what` in the message.
  void ExpectCorrupt(const std::string& bytes, const std::string& what) {
    const std::string path = Write("bad.safetensors", bytes);
    absl::StatusOr<SafetensorsFile> f = ReadSafetensors(path);
    EXPECT_EQ(f.status().code(), absl::StatusCode::kDataLoss) << what;
    EXPECT_THAT(Msg(f.status()), HasSubstr(path));
    EXPECT_THAT(Msg(f.status()), HasSubstr(what));
  }

  std::string dir_;
};

TEST_F(SafetensorsTest, ReadsHandBuiltFile) {
  // Two tensors, deliberately out of offset order in the header, plus metadata and the
  // space padding the reference writer adds.
  const std::vector<float> w = {1.5f, -2.0f, 3.25f, 0.0f, 1e-30f, -7.0f};
  const std::vector<int64_t> ids = {-1, 40000000000LL};
  std::string header =
      R"({"ids":{"dtype":"I64","shape":[2],"data_offsets":[24,40]},)"
      R"("__metadata__":{"format":"pt","note":"hi"},)"
      R"("w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}})";
  header.append((8 - header.size() % 8) % 8, ' ');
  const std::string path = Write("hand.safetensors", MakeFile(header, RawBytes(w) + RawBytes(ids)));

  absl::StatusOr<SafetensorsFile> f = ReadSafetensors(path);
  ASSERT_TRUE(f.ok()) << f.status();
  ASSERT_EQ(f->tensors.size(), 2u);
  const at::Tensor& tw = f->tensors.at("w");
  EXPECT_EQ(tw.scalar_type(), at::kFloat);
  EXPECT_EQ(tw.sizes().vec(), (std::vector<int64_t>{2, 3}));
  for (int i = 0; i < 6; ++i) EXPECT_EQ(tw.data_ptr<float>()[i], w[i]) << i;
  const at::Tensor& tids = f->tensors.at("ids");
  EXPECT_EQ(tids.scalar_type(), at::kLong);
  EXPECT_EQ(tids[0].item<int64_t>(), -1);
  EXPECT_EQ(tids[1].item<int64_t>(), 40000000000LL);
  EXPECT_EQ(f->metadata.at("format"), "pt");
  EXPECT_EQ(f->metadata.at("note"), "hi");
}

TEST_F(SafetensorsTest, ReadsScalarsEmptyTensorsAndUncoveredBytes) {
  // A 0-d scalar, an empty tensor, a BOOL and trailing bytes no tensor claims.
  const std::string header =
      R"({"s":{"dtype":"F64","shape":[],"data_offsets":[0,8]},)"
      R"("e":{"dtype":"F32","shape":[0,4],"data_offsets":[8,8]},)"
      R"("b":{"dtype":"BOOL","shape":[3],"data_offsets":[8,11]}})";
  const std::vector<double> s = {2.5};
  const std::string path = Write(
      "misc.safetensors", MakeFile(header, RawBytes(s) + std::string("\x01\x00\x01", 3) + "tail"));
  absl::StatusOr<SafetensorsFile> f = ReadSafetensors(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->tensors.at("s").dim(), 0);
  EXPECT_EQ(f->tensors.at("s").item<double>(), 2.5);
  EXPECT_EQ(f->tensors.at("e").sizes().vec(), (std::vector<int64_t>{0, 4}));
  EXPECT_TRUE(at::equal(f->tensors.at("b"),
                        at::tensor(std::vector<uint8_t>{1, 0, 1}).to(at::kBool)));
  EXPECT_TRUE(f->metadata.empty());
}

TEST_F(SafetensorsTest, WriterBytesFollowTheFormat) {
  // A non-contiguous input (a transpose) must be written in logical row-major order.
  const at::Tensor base = at::arange(6, at::kFloat).reshape({2, 3});
  const at::Tensor transposed = base.t();  // (3, 2): [[0,3],[1,4],[2,5]]
  const at::Tensor half = at::tensor({1.0, -2.0}, at::kFloat).to(at::kHalf);
  const std::string path = dir_ + "/written.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, {{"t", transposed}, {"h", half}}, {{"step", "7"}}).ok());

  absl::StatusOr<std::string> bytes = ReadFileToString(path);
  ASSERT_TRUE(bytes.ok());
  ASSERT_GE(bytes->size(), 8u);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<uint8_t>((*bytes)[i])) << (8 * i);
  EXPECT_EQ(n % 8, 0u);  // padded so the data is 8-byte aligned
  ASSERT_LE(8 + n, bytes->size());
  const nlohmann::json header = nlohmann::json::parse(bytes->substr(8, n));
  EXPECT_EQ(header["__metadata__"], nlohmann::json({{"step", "7"}}));
  EXPECT_EQ(header["t"]["dtype"], "F32");
  EXPECT_EQ(header["t"]["shape"], nlohmann::json({3, 2}));
  EXPECT_EQ(header["t"]["data_offsets"], nlohmann::json({0, 24}));
  EXPECT_EQ(header["h"]["dtype"], "F16");
  EXPECT_EQ(header["h"]["shape"], nlohmann::json({2}));
  EXPECT_EQ(header["h"]["data_offsets"], nlohmann::json({24, 28}));
  ASSERT_EQ(bytes->size(), 8 + n + 28);

  const char* data = bytes->data() + 8 + n;
  float t_values[6];
  std::memcpy(t_values, data, sizeof(t_values));
  const float expected[6] = {0, 3, 1, 4, 2, 5};
  for (int i = 0; i < 6; ++i) EXPECT_EQ(t_values[i], expected[i]) << i;
  // IEEE half: 1.0 = 0x3C00, -2.0 = 0xC000, little-endian.
  EXPECT_EQ(std::string(data + 24, 4), std::string("\x00\x3C\x00\xC0", 4));
}

TEST_F(SafetensorsTest, RoundTripsEveryDtype) {
  NamedTensors tensors;
  const at::ScalarType types[] = {at::kDouble, at::kFloat, at::kHalf, at::kBFloat16, at::kLong,
                                  at::kInt,    at::kShort, at::kChar, at::kByte,     at::kBool};
  int i = 0;
  for (at::ScalarType type : types) {
    at::Tensor t = (at::arange(12, at::kFloat).reshape({3, 4}) - 5).to(type);
    tensors.emplace_back("t" + std::to_string(i++), t);
  }
  tensors.emplace_back("scalar", at::scalar_tensor(3.0, at::kFloat));
  tensors.emplace_back("empty", at::empty({0}, at::kFloat));
  const std::string path = dir_ + "/all.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, tensors).ok());
  absl::StatusOr<SafetensorsFile> f = ReadSafetensors(path);
  ASSERT_TRUE(f.ok()) << f.status();
  ASSERT_EQ(f->tensors.size(), tensors.size());
  for (const auto& [name, t] : tensors) {
    const at::Tensor& back = f->tensors.at(name);
    EXPECT_EQ(back.scalar_type(), t.scalar_type()) << name;
    EXPECT_TRUE(at::equal(back, t)) << name;
  }
}

// The streaming writer (paged checkpoints) writes the same bytes as the tensor writer, reading
// each tensor in pieces of at most its buffer; a source's error names the file and the tensor.
TEST_F(SafetensorsTest, StreamedWriteIsByteIdenticalToTheTensorWriter) {
  NamedTensors tensors;
  tensors.emplace_back("big", at::arange(5000, at::kFloat).reshape({50, 100}) * 0.5);
  tensors.emplace_back("half", (at::arange(7, at::kFloat) - 3).to(at::kHalf));
  tensors.emplace_back("step", at::scalar_tensor(int64_t{42}, at::kLong));
  tensors.emplace_back("empty", at::empty({0, 3}, at::kFloat));
  std::vector<TensorSource> sources;
  int64_t reads = 0, largest = 0;
  for (const auto& [name, t] : tensors) {
    const at::Tensor c = t.contiguous();
    sources.push_back({name, c.scalar_type(), c.sizes().vec(),
                       [c, &reads, &largest](int64_t offset, int64_t bytes, char* out) {
                         ++reads;
                         largest = std::max(largest, bytes);
                         std::memcpy(out, static_cast<const char*>(c.data_ptr()) + offset, bytes);
                         return absl::OkStatus();
                       }});
  }
  const std::map<std::string, std::string> meta = {{"format", "test"}};
  ASSERT_TRUE(WriteSafetensors(dir_ + "/a.safetensors", tensors, meta).ok());
  ASSERT_TRUE(WriteSafetensors(dir_ + "/b.safetensors", sources, meta, /*buffer_bytes=*/4096).ok());
  const absl::StatusOr<std::string> a = ReadFileToString(dir_ + "/a.safetensors");
  const absl::StatusOr<std::string> b = ReadFileToString(dir_ + "/b.safetensors");
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(*a, *b);
  EXPECT_LE(largest, 4096);
  EXPECT_GE(reads, 5) << "the 20000-byte tensor came in pieces";

  sources[1].read = [](int64_t, int64_t, char*) { return absl::DataLossError("chunk 3 is torn"); };
  const absl::Status bad = WriteSafetensors(dir_ + "/c.safetensors", sources, meta, 4096);
  EXPECT_EQ(bad.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(bad.message().find("'half'"), std::string::npos) << bad;
  EXPECT_NE(bad.message().find("chunk 3 is torn"), std::string::npos) << bad;
}

TEST_F(SafetensorsTest, WriterRejectsBadInput) {
  const std::string path = dir_ + "/x.safetensors";
  const at::Tensor t = at::ones({2});
  EXPECT_EQ(WriteSafetensors(path, {{"a", t}, {"a", t}}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(WriteSafetensors(path, {{"__metadata__", t}}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(WriteSafetensors(path, {{"c", at::ones({2}, at::kComplexFloat)}}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(WriteSafetensors(path, {{"u", at::Tensor()}}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(WriteSafetensors(dir_ + "/no/such/dir/x.safetensors", {{"a", t}}).code(),
            absl::StatusCode::kInternal);
}

TEST_F(SafetensorsTest, MissingFileIsNotFound) {
  EXPECT_EQ(ReadSafetensors(dir_ + "/nope.safetensors").status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(SafetensorsTest, TruncatedFiles) {
  ExpectCorrupt("", "too short");
  ExpectCorrupt(std::string("\x10\x00\x00", 3), "too short");
  // A valid file cut inside its data: the offsets now run past the end.
  const std::string good =
      MakeFile(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})",
               RawBytes(std::vector<float>{1, 2, 3, 4}));
  ExpectCorrupt(good.substr(0, good.size() - 3), "past the data region");
  // Cut inside the header.
  ExpectCorrupt(good.substr(0, 20), "runs past the end");
}

TEST_F(SafetensorsTest, HeaderLengthBeyondFileOrLimit) {
  ExpectCorrupt(U64Le(1000) + "{}", "runs past the end");
  ExpectCorrupt(U64Le(200'000'000) + "{}", "exceeds the limit");
  ExpectCorrupt(U64Le(~0ULL) + "{}", "exceeds the limit");
}

TEST_F(SafetensorsTest, BadJson) {
  ExpectCorrupt(MakeFile(R"({"w": {"dtype": "F32", )", ""), "not valid JSON");
  ExpectCorrupt(MakeFile("[1, 2]", ""), "not a JSON object");
  ExpectCorrupt(MakeFile(std::string("{\"\xff\": 1}"), ""), "not valid JSON");  // bad UTF-8
  ExpectCorrupt(MakeFile(R"({"__metadata__": {"a": 1}})", ""), "__metadata__");
  ExpectCorrupt(MakeFile(R"({"w": 3})", ""), "not an object");
}

TEST_F(SafetensorsTest, UnknownDtype) {
  ExpectCorrupt(MakeFile(R"({"w":{"dtype":"F31","shape":[1],"data_offsets":[0,4]}})",
                         std::string(4, '\0')),
                "unsupported dtype \"F31\"");
}

TEST_F(SafetensorsTest, OffsetsMismatchingShape) {
  ExpectCorrupt(MakeFile(R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}})",
                         std::string(16, '\0')),
                "needs 16");
  ExpectCorrupt(MakeFile(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})",
                         std::string(4, '\0')),
                "reversed");
  ExpectCorrupt(MakeFile(R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})",
                         std::string(4, '\0')),
                "non-negative");
  ExpectCorrupt(MakeFile(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0]}})",
                         std::string(4, '\0')),
                "data_offsets");
  ExpectCorrupt(MakeFile(R"({"w":{"dtype":"F32","data_offsets":[0,4]}})", std::string(4, '\0')),
                "shape");
  // numel * itemsize overflows 64 bits.
  ExpectCorrupt(
      MakeFile(R"({"w":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}})",
               std::string(8, '\0')),
      "overflow");
}

TEST_F(SafetensorsTest, OverlappingRanges) {
  ExpectCorrupt(MakeFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                         R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                         std::string(12, '\0')),
                "overlap");
}

TEST_F(SafetensorsTest, DuplicateNames) {
  ExpectCorrupt(MakeFile(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                         R"("a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})",
                         std::string(2, '\0')),
                "duplicate tensor name 'a'");
}

}  // namespace
}  // namespace shoal::runtime
