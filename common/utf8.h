// UTF-8 validation as RFC 3629 (and the Unicode Standard's table 3-7, "Well-Formed UTF-8 Byte
// Sequences") defines it: no overlong forms, no UTF-16 surrogates (U+D800..U+DFFF), nothing
// above U+10FFFF, no truncated sequences. Used where text from outside (input corpora, label
// values, names) must be well-formed before it goes on. Pure functions; thread-safe.
#ifndef SHOAL_COMMON_UTF8_H_
#define SHOAL_COMMON_UTF8_H_

#include <cstddef>
#include <string>
#include <string_view>

namespace shoal {

// Offset of the first byte of `s` that does not start a well-formed UTF-8 sequence, or
// std::string_view::npos when all of `s` is well-formed. Every byte before the offset belongs to
// a well-formed sequence. Fast on ASCII (8 bytes at a time).
size_t FirstInvalidUtf8(std::string_view s);

// True when all of `s` is well-formed UTF-8 (the empty string is).
inline bool IsValidUtf8(std::string_view s) {
  return FirstInvalidUtf8(s) == std::string_view::npos;
}

// `s` with each byte that does not start a well-formed sequence replaced by U+FFFD (EF BF BD);
// scanning resumes at the next byte. Well-formed sequences are copied unchanged, so valid input
// comes back as is.
std::string ReplaceInvalidUtf8(std::string_view s);

}  // namespace shoal

#endif  // SHOAL_COMMON_UTF8_H_
