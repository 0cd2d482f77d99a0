#include "runtime/tokenizer.h"

#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace shoal::runtime {
namespace {

// Every byte is its own id. Lossless for any input, and small enough that the embedding table of
// a toy model stays tiny; the price is ~4x longer sequences than a BPE on English text.
class ByteTokenizer final : public Tokenizer {
 public:
  std::string name() const override { return "byte"; }
  int vocab_size() const override { return 256; }

  void Encode(absl::string_view text, std::vector<uint16_t>* out) const override {
    out->reserve(out->size() + text.size());
    for (char c : text) out->push_back(static_cast<unsigned char>(c));
  }

  absl::StatusOr<std::string> Decode(const std::vector<uint16_t>& ids) const override {
    std::string text;
    text.reserve(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) {
      if (ids[i] >= 256) {
        return absl::InvalidArgumentError(absl::StrCat(
            "byte tokenizer: id ", ids[i], " at position ", i, " is out of range (vocab 256)"));
      }
      text.push_back(static_cast<char>(ids[i]));
    }
    return text;
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> MakeTokenizer(const std::string& name) {
  if (name == "byte") return std::unique_ptr<Tokenizer>(std::make_unique<ByteTokenizer>());
  if (name == "gpt2") {
    return absl::InvalidArgumentError(
        "tokenizer \"gpt2\" is not available yet; known tokenizers: byte");
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown tokenizer \"", name, "\"; known tokenizers: byte (gpt2 not yet available)"));
}

}  // namespace shoal::runtime
