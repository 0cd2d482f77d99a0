// Tests for common/file_util.h, common/sha256.h and the formatting helpers of common/progress.h.
// Files are real, in a temporary directory; SHA-256 digests are the published FIPS 180-2 vectors.
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/file_util.h"
#include "common/progress.h"
#include "common/sha256.h"
#include "tests/test_util.h"

namespace shoal {
namespace {

using ::shoal::testing::ReadTextFile;
using ::shoal::testing::TempDir;
using ::shoal::testing::WriteTextFile;
using ::testing::ElementsAre;
using ::testing::IsEmpty;

// ---------------------------------------------------------------------------------------------
// file_util

TEST(WriteFileAtomicTest, CreatesFileWithContentsAndLeavesNoTemporaries) {
  TempDir dir;
  const std::string path = dir / "out.bin";
  const std::string contents("binary\0data\nwith zero", 21);
  ASSERT_TRUE(WriteFileAtomic(path, contents).ok());
  EXPECT_EQ(ReadTextFile(path), contents);
  auto names = ListDirectory(dir.path());
  ASSERT_TRUE(names.ok()) << names.status();
  EXPECT_THAT(*names, ElementsAre("out.bin"));
}

TEST(WriteFileAtomicTest, ReplacesExistingFileAndLeavesNoTemporaries) {
  TempDir dir;
  const std::string path = dir / "state.txt";
  WriteTextFile(path, "a much longer old content that must disappear entirely");
  ASSERT_TRUE(WriteFileAtomic(path, "new").ok());
  EXPECT_EQ(ReadTextFile(path), "new");
  ASSERT_TRUE(WriteFileAtomic(path, "").ok());
  EXPECT_EQ(ReadTextFile(path), "");
  auto names = ListDirectory(dir.path());
  ASSERT_TRUE(names.ok()) << names.status();
  EXPECT_THAT(*names, ElementsAre("state.txt"));
}

TEST(WriteFileAtomicTest, MissingParentDirectoryFailsAndCreatesNothing) {
  TempDir dir;
  const absl::Status s = WriteFileAtomic(dir / "no_such_dir/file", "x");
  EXPECT_FALSE(s.ok());
  auto names = ListDirectory(dir.path());
  ASSERT_TRUE(names.ok()) << names.status();
  EXPECT_THAT(*names, IsEmpty());
}

TEST(WriteFileSyncedTest, WritesContents) {
  TempDir dir;
  const std::string path = dir / "f";
  ASSERT_TRUE(WriteFileSynced(path, "hello").ok());
  EXPECT_EQ(ReadTextFile(path), "hello");
}

TEST(ReadFileToStringTest, ReadsWholeFileIncludingZeroBytes) {
  TempDir dir;
  const std::string path = dir / "f";
  std::string contents;
  for (int i = 0; i < 100000; ++i) contents.push_back(static_cast<char>(i * 7 % 256));
  WriteTextFile(path, contents);
  auto read = ReadFileToString(path);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(*read, contents);
}

TEST(ReadFileToStringTest, EmptyFileReadsAsEmptyString) {
  TempDir dir;
  WriteTextFile(dir / "empty", "");
  auto read = ReadFileToString(dir / "empty");
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(*read, "");
}

TEST(ReadFileToStringTest, MissingFileIsNotFound) {
  TempDir dir;
  auto read = ReadFileToString(dir / "missing");
  EXPECT_EQ(read.status().code(), absl::StatusCode::kNotFound);
}

TEST(MakeDirsTest, CreatesNestedDirectoriesAndIsIdempotent) {
  TempDir dir;
  const std::string nested = dir / "a/b/c";
  ASSERT_TRUE(MakeDirs(nested).ok());
  EXPECT_TRUE(IsDirectory(dir / "a"));
  EXPECT_TRUE(IsDirectory(dir / "a/b"));
  EXPECT_TRUE(IsDirectory(nested));
  EXPECT_TRUE(MakeDirs(nested).ok());
  EXPECT_TRUE(IsDirectory(nested));
}

TEST(MakeDirsTest, FailsWhenAFileIsInTheWay) {
  TempDir dir;
  WriteTextFile(dir / "file", "x");
  EXPECT_FALSE(MakeDirs(dir / "file/sub").ok());
}

TEST(RemoveAllTest, RemovesFileAndDirectoryTree) {
  TempDir dir;
  ASSERT_TRUE(MakeDirs(dir / "tree/x/y").ok());
  WriteTextFile(dir / "tree/x/y/f1", "1");
  WriteTextFile(dir / "tree/f2", "2");
  WriteTextFile(dir / "single", "3");
  ASSERT_TRUE(RemoveAll(dir / "tree").ok());
  EXPECT_FALSE(PathExists(dir / "tree"));
  ASSERT_TRUE(RemoveAll(dir / "single").ok());
  EXPECT_FALSE(PathExists(dir / "single"));
  auto names = ListDirectory(dir.path());
  ASSERT_TRUE(names.ok()) << names.status();
  EXPECT_THAT(*names, IsEmpty());
}

TEST(RemoveAllTest, MissingPathIsNotAnError) {
  TempDir dir;
  EXPECT_TRUE(RemoveAll(dir / "never_existed").ok());
  EXPECT_TRUE(RemoveAll(dir / "never/existed/either").ok());
}

TEST(PathExistsTest, DistinguishesFilesDirectoriesAndMissing) {
  TempDir dir;
  WriteTextFile(dir / "f", "x");
  EXPECT_TRUE(PathExists(dir / "f"));
  EXPECT_FALSE(IsDirectory(dir / "f"));
  EXPECT_TRUE(PathExists(dir.path()));
  EXPECT_TRUE(IsDirectory(dir.path()));
  EXPECT_FALSE(PathExists(dir / "missing"));
  EXPECT_FALSE(IsDirectory(dir / "missing"));
}

TEST(ListDirectoryTest, ReturnsSortedNamesWithoutDotEntries) {
  TempDir dir;
  WriteTextFile(dir / "zeta", "");
  WriteTextFile(dir / "alpha", "");
  WriteTextFile(dir / "Beta", "");
  WriteTextFile(dir / "step_00010", "");
  WriteTextFile(dir / "step_00002", "");
  ASSERT_TRUE(MakeDirs(dir / "middle").ok());
  WriteTextFile(dir / "middle/inner", "");  // not listed: only direct entries
  auto names = ListDirectory(dir.path());
  ASSERT_TRUE(names.ok()) << names.status();
  EXPECT_THAT(*names, ElementsAre("Beta", "alpha", "middle", "step_00002", "step_00010", "zeta"));
}

TEST(ListDirectoryTest, EmptyDirectoryGivesEmptyList) {
  TempDir dir;
  auto names = ListDirectory(dir.path());
  ASSERT_TRUE(names.ok()) << names.status();
  EXPECT_THAT(*names, IsEmpty());
}

TEST(ListDirectoryTest, MissingDirectoryIsNotFound) {
  TempDir dir;
  EXPECT_EQ(ListDirectory(dir / "missing").status().code(), absl::StatusCode::kNotFound);
}

TEST(DirNameTest, Cases) {
  EXPECT_EQ(DirName("file.txt"), ".");
  EXPECT_EQ(DirName("a/b"), "a");
  EXPECT_EQ(DirName("a/b/c.bin"), "a/b");
  EXPECT_EQ(DirName("/abs/path/file"), "/abs/path");
  EXPECT_EQ(DirName("/file"), "/");
  EXPECT_EQ(DirName("./x"), ".");
}

// ---------------------------------------------------------------------------------------------
// sha256 (FIPS 180-2, appendix B, plus the empty message)

constexpr char kAbcDigest[] = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
constexpr char kEmptyDigest[] = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
constexpr char k448BitMessage[] = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
constexpr char k448BitDigest[] = "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1";
// FIPS 180-2 B.3: one million repetitions of 'a'.
constexpr char kMillionADigest[] =
    "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0";

TEST(Sha256Test, FipsVectors) {
  EXPECT_EQ(Sha256Hex("abc", 3), kAbcDigest);
  EXPECT_EQ(Sha256Hex("", 0), kEmptyDigest);
  EXPECT_EQ(Sha256Hex(k448BitMessage, sizeof(k448BitMessage) - 1), k448BitDigest);
  const std::string million(1000000, 'a');
  EXPECT_EQ(Sha256Hex(million.data(), million.size()), kMillionADigest);
}

TEST(Sha256Test, EmptyWithNullPointer) { EXPECT_EQ(Sha256Hex(nullptr, 0), kEmptyDigest); }

TEST(Sha256Test, DigestIsLowercaseHexOf64Chars) {
  const std::string d = Sha256Hex("shoal", 5);
  ASSERT_EQ(d.size(), 64u);
  for (char ch : d) EXPECT_TRUE((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f')) << d;
}

TEST(Sha256FileTest, EqualsSha256HexOfTheSameBytes) {
  TempDir dir;
  // Sizes around the 64-byte block and 55/56-byte padding boundaries, and a larger file.
  for (size_t size : {0, 1, 55, 56, 63, 64, 65, 119, 120, 1000, 70001}) {
    std::string contents;
    for (size_t i = 0; i < size; ++i) contents.push_back(static_cast<char>((i * 131 + 7) % 256));
    const std::string path = dir / ("f" + std::to_string(size));
    WriteTextFile(path, contents);
    auto digest = Sha256File(path);
    ASSERT_TRUE(digest.ok()) << digest.status();
    EXPECT_EQ(*digest, Sha256Hex(contents.data(), contents.size())) << "size " << size;
  }
}

TEST(Sha256FileTest, FileWithFipsVector) {
  TempDir dir;
  WriteTextFile(dir / "abc", "abc");
  auto digest = Sha256File(dir / "abc");
  ASSERT_TRUE(digest.ok()) << digest.status();
  EXPECT_EQ(*digest, kAbcDigest);
}

TEST(Sha256FileTest, MissingFileIsNotFound) {
  TempDir dir;
  EXPECT_EQ(Sha256File(dir / "missing").status().code(), absl::StatusCode::kNotFound);
}

// ---------------------------------------------------------------------------------------------
// progress formatting

TEST(FormatDurationTest, MinutesAndSeconds) {
  EXPECT_EQ(FormatDuration(0), "0:00");
  EXPECT_EQ(FormatDuration(5), "0:05");
  EXPECT_EQ(FormatDuration(59), "0:59");
  EXPECT_EQ(FormatDuration(60), "1:00");
  EXPECT_EQ(FormatDuration(123), "2:03");
  EXPECT_EQ(FormatDuration(3599), "59:59");
}

TEST(FormatDurationTest, HoursMinutesSeconds) {
  EXPECT_EQ(FormatDuration(3600), "1:00:00");
  EXPECT_EQ(FormatDuration(3723), "1:02:03");
  EXPECT_EQ(FormatDuration(36000 + 59 * 60 + 1), "10:59:01");
}

TEST(FormatDurationTest, NegativeOrNonFiniteIsQuestionMark) {
  EXPECT_EQ(FormatDuration(-1), "?");
  EXPECT_EQ(FormatDuration(std::numeric_limits<double>::quiet_NaN()), "?");
  EXPECT_EQ(FormatDuration(std::numeric_limits<double>::infinity()), "?");
}

TEST(FormatBytesTest, Cases) {
  EXPECT_EQ(FormatBytes(0), "0 B");
  EXPECT_EQ(FormatBytes(17), "17 B");
  EXPECT_EQ(FormatBytes(999), "999 B");
  EXPECT_EQ(FormatBytes(812000), "812 kB");
  EXPECT_EQ(FormatBytes(4.4e6), "4.4 MB");
  EXPECT_EQ(FormatBytes(2.1e6), "2.1 MB");
  EXPECT_EQ(FormatBytes(3.5e9), "3.5 GB");
}

}  // namespace
}  // namespace shoal
