// `shoal prepare-data`: text files -> DIR/train.bin, DIR/val.bin (little-endian uint16 token ids,
// nanoGPT's layout) and DIR/meta.json. Blocking; shows a progress bar on stderr.
//
// meta.json: {"format": "shoal-tokens-v1", "tokenizer": "byte", "vocab_size": 256,
//             "dtype": "uint16", "train_tokens": N, "val_tokens": M,
//             "train_sha256": "...", "val_sha256": "...", "sources": [...paths...]}
#ifndef SHOAL_RUNTIME_PREPARE_DATA_H_
#define SHOAL_RUNTIME_PREPARE_DATA_H_

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace shoal::runtime {

struct PrepareDataOptions {
  // Files or folders, taken in the order given. Folders are walked recursively and contribute
  // their regular files in sorted path order; hidden entries (".name") are skipped, and so is
  // `out_dir` if it lies inside a folder. Each non-empty file is one document; documents are
  // joined with "\n\n" before tokenizing.
  std::vector<std::string> inputs;
  // Output folder, created if missing.
  std::string out_dir;
  // Share of tokens that goes to val.bin, in (0, 0.5]: the last floor(N * val_fraction) tokens
  // of the stream of N; train.bin gets the rest. Both must be non-empty.
  double val_fraction = 0.1;
  // Tokenizer name, see MakeTokenizer.
  std::string tokenizer = "byte";
  // Show a progress bar.
  bool progress = true;
};

// kInvalidArgument names a bad option, a missing input, a file that is not UTF-8 text (with the
// byte offset of the first bad byte), or inputs too small for two non-empty splits.
// Outputs are written atomically: all three go to temporary files first, so a failure leaves an
// existing DIR untouched; they are then renamed into place, meta.json last.
absl::Status PrepareData(const PrepareDataOptions& options);

}  // namespace shoal::runtime

#endif  // SHOAL_RUNTIME_PREPARE_DATA_H_
