// Tests for common/utf8.h against two independent references: byte sequences derived by hand
// from the Unicode Standard (chapter 3, table 3-7 "Well-Formed UTF-8 Byte Sequences", and the
// encoding form of D92), and a plain decoder written here, which reads the code point from the
// bit patterns and then applies the rules to its value (the library checks byte ranges instead).
// The decoder is compared exhaustively on every string of 1, 2 and 3 bytes, on every code point's
// encoding, and on random longer strings.
#include <cstdint>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include <gtest/gtest.h>

#include "common/utf8.h"

namespace shoal {
namespace {

constexpr size_t kNpos = std::string_view::npos;
const std::string kFffd = "\xEF\xBF\xBD";

// ---- The reference. ----

// The length of the well-formed sequence that starts at s[i], or 0 if none does.
size_t RefSequenceLength(std::string_view s, size_t i) {
  const auto c = static_cast<unsigned char>(s[i]);
  size_t len;
  uint32_t cp;
  if ((c & 0x80) == 0x00) return 1;  // 0xxxxxxx
  if ((c & 0xE0) == 0xC0) {          // 110xxxxx 10xxxxxx
    len = 2;
    cp = c & 0x1F;
  } else if ((c & 0xF0) == 0xE0) {  // 1110xxxx 10xxxxxx 10xxxxxx
    len = 3;
    cp = c & 0x0F;
  } else if ((c & 0xF8) == 0xF0) {  // 11110xxx 10xxxxxx 10xxxxxx 10xxxxxx
    len = 4;
    cp = c & 0x07;
  } else {
    return 0;  // a continuation byte, or 11111xxx
  }
  if (i + len > s.size()) return 0;
  for (size_t k = 1; k < len; ++k) {
    const auto cc = static_cast<unsigned char>(s[i + k]);
    if ((cc & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (cc & 0x3F);
  }
  const uint32_t shortest_min = len == 2 ? 0x80 : len == 3 ? 0x800 : 0x10000;
  if (cp < shortest_min) return 0;                // overlong
  if (cp >= 0xD800 && cp <= 0xDFFF) return 0;     // a UTF-16 surrogate
  if (cp > 0x10FFFF) return 0;                    // beyond Unicode
  return len;
}

size_t RefFirstInvalid(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const size_t len = RefSequenceLength(s, i);
    if (len == 0) return i;
    i += len;
  }
  return kNpos;
}

std::string RefReplace(std::string_view s) {
  std::string out;
  size_t i = 0;
  while (i < s.size()) {
    const size_t len = RefSequenceLength(s, i);
    if (len == 0) {
      out += kFffd;
      ++i;
    } else {
      out.append(s.substr(i, len));
      i += len;
    }
  }
  return out;
}

// The encoding of D92 for any value up to 0x1FFFFF (so also values that are not code points).
std::string Encode(uint32_t cp) {
  std::string out;
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return out;
}

// The same value in `len` bytes, whether or not that is its shortest form (len >= the shortest).
std::string EncodeIn(uint32_t cp, int len) {
  static constexpr unsigned char kLead[] = {0, 0x00, 0xC0, 0xE0, 0xF0};
  std::string out(static_cast<size_t>(len), '\0');
  for (int k = len - 1; k > 0; --k) {
    out[k] = static_cast<char>(0x80 | (cp & 0x3F));
    cp >>= 6;
  }
  out[0] = static_cast<char>(kLead[len] | cp);
  return out;
}

// Checks the three functions on `s` against the reference.
void ExpectMatchesReference(std::string_view s) {
  const size_t want = RefFirstInvalid(s);
  ASSERT_EQ(FirstInvalidUtf8(s), want) << "bytes: " << ::testing::PrintToString(std::string(s));
  ASSERT_EQ(IsValidUtf8(s), want == kNpos);
  ASSERT_EQ(ReplaceInvalidUtf8(s), RefReplace(s));
}

// ---- Cases from the standard, by hand. ----

struct HandCase {
  const char* what;
  std::string bytes;
  size_t first_invalid;  // kNpos: well-formed
};

TEST(Utf8Test, HandDerivedCasesFromTable3_7) {
  const std::vector<HandCase> cases = {
      {"empty", "", kNpos},
      {"ASCII", "hello, world", kNpos},
      {"NUL and DEL are ASCII", std::string("a\0b\x7F", 4), kNpos},
      // Each row of table 3-7, at its smallest and largest code point.
      {"U+0080 (C2 80)", "\xC2\x80", kNpos},
      {"U+07FF (DF BF)", "\xDF\xBF", kNpos},
      {"U+0800 (E0 A0 80)", "\xE0\xA0\x80", kNpos},
      {"U+0FFF (E0 BF BF)", "\xE0\xBF\xBF", kNpos},
      {"U+1000 (E1 80 80)", "\xE1\x80\x80", kNpos},
      {"U+CFFF (EC BF BF)", "\xEC\xBF\xBF", kNpos},
      {"U+D000 (ED 80 80)", "\xED\x80\x80", kNpos},
      {"U+D7FF (ED 9F BF)", "\xED\x9F\xBF", kNpos},
      {"U+E000 (EE 80 80)", "\xEE\x80\x80", kNpos},
      {"U+FFFF (EF BF BF)", "\xEF\xBF\xBF", kNpos},
      {"U+10000 (F0 90 80 80)", "\xF0\x90\x80\x80", kNpos},
      {"U+3FFFF (F0 BF BF BF)", "\xF0\xBF\xBF\xBF", kNpos},
      {"U+40000 (F1 80 80 80)", "\xF1\x80\x80\x80", kNpos},
      {"U+FFFFF (F3 BF BF BF)", "\xF3\xBF\xBF\xBF", kNpos},
      {"U+100000 (F4 80 80 80)", "\xF4\x80\x80\x80", kNpos},
      {"U+10FFFF (F4 8F BF BF)", "\xF4\x8F\xBF\xBF", kNpos},
      {"mixed: e-acute, euro sign, G clef", "caf\xC3\xA9 \xE2\x82\xAC \xF0\x9D\x84\x9E", kNpos},
      // Overlong forms.
      {"'/' in 2 bytes (C0 AF)", "\xC0\xAF", 0},
      {"U+007F in 2 bytes (C1 BF)", "\xC1\xBF", 0},
      {"'/' in 3 bytes (E0 80 AF)", "\xE0\x80\xAF", 0},
      {"U+07FF in 3 bytes (E0 9F BF)", "\xE0\x9F\xBF", 0},
      {"'/' in 4 bytes (F0 80 80 AF)", "\xF0\x80\x80\xAF", 0},
      {"U+FFFF in 4 bytes (F0 8F BF BF)", "\xF0\x8F\xBF\xBF", 0},
      // Surrogates, high and low, and a CESU-8 pair.
      {"U+D800 (ED A0 80)", "x\xED\xA0\x80", 1},
      {"U+DBFF (ED AF BF)", "\xED\xAF\xBF", 0},
      {"U+DC00 (ED B0 80)", "\xED\xB0\x80", 0},
      {"U+DFFF (ED BF BF)", "ab\xED\xBF\xBF", 2},
      {"surrogate pair (ED A0 BD ED B2 A9)", "\xED\xA0\xBD\xED\xB2\xA9", 0},
      // Beyond U+10FFFF, and leads that never occur.
      {"U+110000 (F4 90 80 80)", "\xF4\x90\x80\x80", 0},
      {"U+13FFFF (F4 BF BF BF)", "\xF4\xBF\xBF\xBF", 0},
      {"F5 lead", "\xF5\x80\x80\x80", 0},
      {"F8 lead (5-byte form)", "\xF8\x88\x80\x80\x80", 0},
      {"FC lead (6-byte form)", "\xFC\x84\x80\x80\x80\x80", 0},
      {"FE", "ok\xFE", 2},
      {"FF", "\xFF", 0},
      // Continuation bytes without a lead.
      {"lone 80", "a\x80", 1},
      {"lone BF", "\xBF", 0},
      {"two-byte sequence plus a stray continuation", "\xC3\xA9\xA9", 2},
      // Truncated sequences, at the end and in the middle.
      {"C3 at the end", "caf\xC3", 3},
      {"E2 82 at the end", "\xE2\x82", 0},
      {"F0 9F 98 at the end", "smile \xF0\x9F\x98", 6},
      {"E2 82 then ASCII", "\xE2\x82x", 0},
      {"F0 9F then a new lead", "\xF0\x9F\xC3\xA9", 0},
      {"C3 then ASCII", "\xC3(", 0},
      // Latin-1 text is not UTF-8.
      {"Latin-1 e-acute", "latin-1 caf\xE9!", 11},
  };
  for (const HandCase& c : cases) {
    SCOPED_TRACE(c.what);
    EXPECT_EQ(FirstInvalidUtf8(c.bytes), c.first_invalid);
    EXPECT_EQ(IsValidUtf8(c.bytes), c.first_invalid == kNpos);
    ExpectMatchesReference(c.bytes);
  }
}

TEST(Utf8Test, ReplacementMarksEachBadByteAndKeepsTheRest) {
  EXPECT_EQ(ReplaceInvalidUtf8(""), "");
  EXPECT_EQ(ReplaceInvalidUtf8("caf\xC3\xA9"), "caf\xC3\xA9");
  EXPECT_EQ(ReplaceInvalidUtf8("a\x80" "b\xC3"), "a" + kFffd + "b" + kFffd);
  // An overlong '/' and a surrogate: every one of their five bytes starts no valid sequence.
  EXPECT_EQ(ReplaceInvalidUtf8("\xC0\xAF\xED\xA0\x80"), kFffd + kFffd + kFffd + kFffd + kFffd);
  // A truncated 3-byte sequence before a valid one: the valid one survives.
  EXPECT_EQ(ReplaceInvalidUtf8("\xE2\x82\xE2\x82\xAC"), kFffd + kFffd + "\xE2\x82\xAC");
  EXPECT_EQ(ReplaceInvalidUtf8(kFffd), kFffd);
}

// The ASCII fast path reads 8 bytes at a time: a bad byte at any position around those words
// is still found at its own offset, and one right after a valid multi-byte sequence too.
TEST(Utf8Test, BadByteIsFoundAtEveryPositionAroundTheEightByteWords) {
  for (size_t length = 1; length <= 40; ++length) {
    for (size_t pos = 0; pos < length; ++pos) {
      std::string s(length, 'a');
      s[pos] = '\xFF';
      EXPECT_EQ(FirstInvalidUtf8(s), pos) << "length " << length;
      if (pos + 2 <= length) {
        std::string t(length, 'a');
        t[pos] = '\xC3';
        t[pos + 1] = '\xA9';
        EXPECT_TRUE(IsValidUtf8(t)) << "length " << length << " pos " << pos;
        t[pos + 1] = 'z';
        EXPECT_EQ(FirstInvalidUtf8(t), pos) << "length " << length;
      }
    }
  }
}

// ---- Exhaustive and random comparisons with the reference decoder. ----

TEST(Utf8Test, EveryOneAndTwoByteStringMatchesTheReference) {
  for (int a = 0; a < 256; ++a) {
    const std::string one(1, static_cast<char>(a));
    ExpectMatchesReference(one);
    for (int b = 0; b < 256; ++b) {
      const std::string two = {static_cast<char>(a), static_cast<char>(b)};
      ExpectMatchesReference(two);
    }
  }
}

// 2^24 strings: the offset is compared for all of them, the replacement for those with a
// byte >= 0x80 in the first place (the others reduce to the 2-byte case after one ASCII byte).
TEST(Utf8Test, EveryThreeByteStringMatchesTheReference) {
  std::string s(3, '\0');
  int mismatches = 0;
  for (uint32_t v = 0; v < (1u << 24) && mismatches < 10; ++v) {
    s[0] = static_cast<char>(v >> 16);
    s[1] = static_cast<char>((v >> 8) & 0xFF);
    s[2] = static_cast<char>(v & 0xFF);
    const size_t want = RefFirstInvalid(s);
    if (FirstInvalidUtf8(s) != want) {
      ADD_FAILURE() << "bytes " << ::testing::PrintToString(s) << ": got " << FirstInvalidUtf8(s)
                    << ", want " << want;
      ++mismatches;
    }
    if ((v >> 16) >= 0x80 && ReplaceInvalidUtf8(s) != RefReplace(s)) {
      ADD_FAILURE() << "replacement of " << ::testing::PrintToString(s);
      ++mismatches;
    }
  }
}

// Every value up to 0x1FFFFF in its shortest form (valid unless a surrogate or above U+10FFFF),
// and every code point in each longer form (always overlong).
TEST(Utf8Test, EveryCodePointEncodingIsJudgedByItsValue) {
  int mismatches = 0;
  for (uint32_t cp = 0; cp <= 0x1FFFFF && mismatches < 10; ++cp) {
    const bool scalar = cp <= 0x10FFFF && (cp < 0xD800 || cp > 0xDFFF);
    const std::string s = Encode(cp);
    if (IsValidUtf8(s) != scalar) {
      ADD_FAILURE() << "U+" << std::hex << cp << ": valid " << !scalar;
      ++mismatches;
    }
    const int shortest = static_cast<int>(s.size());
    for (int len = shortest + 1; len <= 4 && cp <= 0x10FFFF; ++len) {
      if (FirstInvalidUtf8(EncodeIn(cp, len)) != 0) {
        ADD_FAILURE() << "U+" << std::hex << cp << " in " << len << " bytes is not overlong";
        ++mismatches;
      }
    }
  }
}

// Random 4-byte strings and random longer mixes of valid sequences and noise. Continuation bytes
// are drawn often, so that 4-byte leads are followed by something close to valid.
TEST(Utf8Test, RandomStringsMatchTheReference) {
  std::mt19937 rng(20240613);
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_int_distribution<int> continuation(0x80, 0xBF);
  std::uniform_int_distribution<int> lead4(0xF0, 0xF7);
  std::uniform_int_distribution<int> coin(0, 3);
  std::uniform_int_distribution<uint32_t> code_point(0, 0x10FFFF);
  std::uniform_int_distribution<int> length(0, 40);
  const auto noisy_byte = [&] {
    return static_cast<char>(coin(rng) == 0 ? byte(rng) : continuation(rng));
  };
  for (int i = 0; i < 1'000'000; ++i) {
    std::string s(4, '\0');
    s[0] = static_cast<char>(coin(rng) == 0 ? byte(rng) : lead4(rng));
    for (int k = 1; k < 4; ++k) s[k] = noisy_byte();
    ExpectMatchesReference(s);
    if (::testing::Test::HasFatalFailure()) return;
  }
  for (int i = 0; i < 200'000; ++i) {
    std::string s;
    const int n = length(rng);
    for (int k = 0; k < n; ++k) {
      switch (coin(rng)) {
        case 0: s += static_cast<char>(byte(rng)); break;
        case 1: s += noisy_byte(); break;
        case 2: s += static_cast<char>('a' + k % 26); break;
        default: s += Encode(code_point(rng)); break;
      }
    }
    ExpectMatchesReference(s);
    if (::testing::Test::HasFatalFailure()) return;
  }
}

}  // namespace
}  // namespace shoal
