// Reading and writing the safetensors format: an 8-byte little-endian header length, a JSON
// header {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
// "__metadata__": {"k": "v"}}, then the raw little-endian tensor bytes. Files written here load
// in the reference safetensors library and vice versa. Reading validates everything it is given
// (header size and JSON, dtypes, shapes against offsets, offsets inside the file, overlaps,
// duplicate names); bytes no tensor claims are allowed, unknown fields of an entry ignored.
// Both calls block; neither keeps state, so they are thread-safe for distinct paths.
#ifndef SHOAL_RUNTIME_SAFETENSORS_H_
#define SHOAL_RUNTIME_SAFETENSORS_H_

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace shoal::runtime {

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

// Writes `tensors` (CPU; F32, F64, F16, BF16, I64, I32, I16, I8, U8, BOOL; any strides: they are
// written contiguous) in the given order, plus string `metadata`, and fsyncs the file.
// kInvalidArgument for an unsupported dtype or duplicate name; kInternal for I/O errors.
absl::Status WriteSafetensors(const std::string& path, const NamedTensors& tensors,
                              const std::map<std::string, std::string>& metadata = {});

// A tensor written piece by piece, for states that are never all in RAM (paged model states):
// `read(offset, bytes, out)` fills `out` with bytes [offset, offset + bytes) of the tensor's
// contiguous little-endian data. `dtype` is one the writer supports (see above).
struct TensorSource {
  std::string name;
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> shape;
  std::function<absl::Status(int64_t offset, int64_t bytes, char* out)> read;
};

// The same file as WriteSafetensors would write for the tensors the sources describe, in their
// order, streamed through a buffer of `buffer_bytes`: the memory it takes is that buffer, whatever
// the size of the state. Errors: as WriteSafetensors, and a source's own (named).
absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorSource>& sources,
                              const std::map<std::string, std::string>& metadata = {},
                              int64_t buffer_bytes = int64_t{16} << 20);

struct SafetensorsFile {
  std::map<std::string, at::Tensor> tensors;   // owned CPU tensors
  std::map<std::string, std::string> metadata;
};

// kNotFound if missing; kDataLoss naming the file and the problem for anything malformed.
absl::StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path);

}  // namespace shoal::runtime

#endif  // SHOAL_RUNTIME_SAFETENSORS_H_
