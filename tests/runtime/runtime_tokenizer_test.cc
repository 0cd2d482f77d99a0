#include "runtime/tokenizer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace shoal::runtime {
namespace {

using ::testing::HasSubstr;

TEST(ByteTokenizerTest, NameAndVocab) {
  auto tok = MakeTokenizer("byte");
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->name(), "byte");
  EXPECT_EQ((*tok)->vocab_size(), 256);
}

TEST(ByteTokenizerTest, EveryByteIsItsOwnId) {
  auto tok = MakeTokenizer("byte");
  ASSERT_TRUE(tok.ok()) << tok.status();
  std::string all;
  for (int b = 0; b < 256; ++b) all.push_back(static_cast<char>(b));
  std::vector<uint16_t> ids;
  (*tok)->Encode(all, &ids);
  ASSERT_EQ(ids.size(), 256u);
  for (int b = 0; b < 256; ++b) EXPECT_EQ(ids[b], b) << "byte " << b;
}

TEST(ByteTokenizerTest, EncodeAppends) {
  auto tok = MakeTokenizer("byte");
  ASSERT_TRUE(tok.ok()) << tok.status();
  std::vector<uint16_t> ids = {7};
  (*tok)->Encode("AB", &ids);
  (*tok)->Encode("", &ids);
  (*tok)->Encode("\n", &ids);
  EXPECT_EQ(ids, (std::vector<uint16_t>{7, 65, 66, 10}));
}

TEST(ByteTokenizerTest, RoundTripsUtf8Text) {
  auto tok = MakeTokenizer("byte");
  ASSERT_TRUE(tok.ok()) << tok.status();
  const std::string text =
      "In the beginning, h\xC3\xA9llo \xE4\xB8\x96\xE7\x95\x8C \xF0\x9F\x98\x80\n";
  std::vector<uint16_t> ids;
  (*tok)->Encode(text, &ids);
  EXPECT_EQ(ids.size(), text.size());  // one id per byte, not per code point
  auto back = (*tok)->Decode(ids);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, text);
}

TEST(ByteTokenizerTest, DecodeRejectsOutOfRangeId) {
  auto tok = MakeTokenizer("byte");
  ASSERT_TRUE(tok.ok()) << tok.status();
  auto back = (*tok)->Decode({104, 105, 256});
  EXPECT_EQ(back.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(back.status().message(), HasSubstr("256"));
  EXPECT_THAT(back.status().message(), HasSubstr("position 2"));
}

TEST(MakeTokenizerTest, Gpt2IsReservedButNotAvailable) {
  auto tok = MakeTokenizer("gpt2");
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(tok.status().message(), HasSubstr("gpt2"));
  EXPECT_THAT(tok.status().message(), HasSubstr("not available"));
}

TEST(MakeTokenizerTest, UnknownNameListsKnownNames) {
  auto tok = MakeTokenizer("sentencepiece");
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(tok.status().message(), HasSubstr("sentencepiece"));
  EXPECT_THAT(tok.status().message(), HasSubstr("byte"));
}

}  // namespace
}  // namespace shoal::runtime
