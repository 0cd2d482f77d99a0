// Tensors on a swarm stage call's stream (proto/swarm.proto): a header declares each tensor
// (TensorMeta: codec, shape, encoded size), then the encoded bytes follow as TensorPieces of at
// most MAX_PIECE_BYTES, tensor after tensor, each piece starting where the one before it ended.
//
// EncodeForWire turns a tensor into its declaration and bytes (float32 through comm/wire_codec.h,
// int64 token ids as they are); AppendPieces cuts the bytes into pieces. TensorAssembler is the
// receiving side: it checks every declaration before accepting a byte (a known codec, a shape of
// at most kMaxWireDims non-negative dimensions, the encoded size the codec and shape imply, a
// total within the receiver's limit), then every piece (the tensor in progress, the offset
// reached, a size in [1, MAX_PIECE_BYTES], nothing past the declared end), and decodes a tensor
// only once all of its bytes are in. Whatever a peer sends, a bad stream is refused with
// kInvalidArgument naming the tensor and what is wrong, and nothing is decoded from it.
#ifndef SHOAL_COMM_TENSOR_STREAM_H_
#define SHOAL_COMM_TENSOR_STREAM_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "proto/swarm.pb.h"

namespace shoal::comm {

// The most payload bytes in one piece: swarm.proto's MAX_PIECE_BYTES (4 MiB), defined there once.
inline constexpr int64_t kMaxPieceBytes = v1::MAX_PIECE_BYTES;

struct WireTensor {
  v1::TensorMeta meta;
  std::string bytes;  // meta.encoded_bytes() bytes
};

// A float32 tensor in `codec` (fp32, bf16 or int8-blockwise), or an int64 tensor as
// TENSOR_CODEC_INT64. kInvalidArgument for another dtype, a codec that does not fit the dtype,
// or what comm::Encode refuses (inf/NaN in int8-blockwise, naming the element).
absl::StatusOr<WireTensor> EncodeForWire(const at::Tensor& tensor, v1::TensorCodec codec);

// Appends `bytes` as pieces of tensor `index`, each of at most `piece_bytes` (<= kMaxPieceBytes),
// offsets from 0. An empty tensor gets no piece.
void AppendPieces(int index, absl::string_view bytes, std::vector<v1::TensorPiece>* out,
                  int64_t piece_bytes = kMaxPieceBytes);

class TensorAssembler {
 public:
  // `names[i]` names tensor i in messages ("input", "grad_output"). kInvalidArgument, naming the
  // tensor and the field, for a declaration that is not acceptable (see the top of the file), a
  // count other than names.size(), or a total above max_total_bytes.
  static absl::StatusOr<TensorAssembler> Create(std::vector<v1::TensorMeta> metas,
                                                std::vector<std::string> names,
                                                int64_t max_total_bytes);

  // Takes the next piece. kInvalidArgument for a piece of another tensor than the one in
  // progress, an offset other than the bytes received so far, an empty or oversized piece, or
  // one that passes the tensor's declared end.
  absl::Status Add(const v1::TensorPiece& piece);
  // OK once every declared byte arrived; else kInvalidArgument naming the first tensor short of
  // its bytes (the stream ended early).
  absl::Status CheckComplete() const;
  // Tensor `index`, decoded: float32 of the declared shape, or int64. REQUIRES: CheckComplete()
  // OK. kInvalidArgument for bytes the codec refuses (comm::Decode's checks).
  absl::StatusOr<at::Tensor> Take(int index) const;

 private:
  TensorAssembler() = default;
  std::vector<v1::TensorMeta> metas_;
  std::vector<std::string> names_;
  std::vector<std::string> bytes_;
  size_t current_ = 0;  // the tensor the next piece belongs to
};

}  // namespace shoal::comm

#endif  // SHOAL_COMM_TENSOR_STREAM_H_
