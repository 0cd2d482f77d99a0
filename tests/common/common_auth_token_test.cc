// Tests for common/auth_token.h: the coordinator's token file, read from real files.
#include "common/auth_token.h"

#include <string>

#include <gtest/gtest.h>

#include "tests/test_util.h"

namespace shoal {
namespace {

using ::shoal::testing::TempDir;
using ::shoal::testing::WriteTextFile;

TEST(AuthTokenTest, TokenFileIsCheckedAndTrimmed) {
  TempDir dir;
  WriteTextFile(dir / "t", "  abc123  \nsecond line\n");
  auto t = ReadTokenFile(dir / "t");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(*t, "abc123");
  WriteTextFile(dir / "empty", "\n");
  EXPECT_EQ(ReadTokenFile(dir / "empty").status().code(), absl::StatusCode::kInvalidArgument);
  WriteTextFile(dir / "bin", std::string("ab\x01", 3));
  EXPECT_EQ(ReadTokenFile(dir / "bin").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ReadTokenFile(dir / "none").status().code(), absl::StatusCode::kNotFound);
}

TEST(AuthTokenTest, LongTokensAreRefusedWithTheirSize) {
  TempDir dir;
  WriteTextFile(dir / "max", std::string(4096, 'a'));
  EXPECT_TRUE(ReadTokenFile(dir / "max").ok());
  WriteTextFile(dir / "long", std::string(4097, 'a'));
  const absl::Status s = ReadTokenFile(dir / "long").status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("4097 bytes"), std::string::npos) << s;
}

}  // namespace
}  // namespace shoal
