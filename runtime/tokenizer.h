// Tokenizers turn text into token ids and back. shoal ships the byte-level tokenizer (vocab 256,
// every byte its own id); the interface is shaped so that a GPT-2 BPE (vocab 50257, still fitting
// the uint16 token files) can be added behind MakeTokenizer without touching its callers.
// Tokenizers are immutable after construction and thread-safe.
#ifndef SHOAL_RUNTIME_TOKENIZER_H_
#define SHOAL_RUNTIME_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace shoal::runtime {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Name recorded in meta.json ("byte").
  virtual std::string name() const = 0;
  // Number of distinct ids; every id produced is < vocab_size() <= 65536.
  virtual int vocab_size() const = 0;
  // Appends the ids of `text` to `out`.
  virtual void Encode(absl::string_view text, std::vector<uint16_t>* out) const = 0;
  // Inverse of Encode. kInvalidArgument for an id >= vocab_size().
  virtual absl::StatusOr<std::string> Decode(const std::vector<uint16_t>& ids) const = 0;
};

// "byte" -> the byte tokenizer. Any other name: kInvalidArgument listing the known names
// ("gpt2" is reserved and reported as not yet available).
absl::StatusOr<std::unique_ptr<Tokenizer>> MakeTokenizer(const std::string& name);

}  // namespace shoal::runtime

#endif  // SHOAL_RUNTIME_TOKENIZER_H_
