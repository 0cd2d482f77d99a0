// WireCodec: how a float32 tensor (an activation or its gradient between pipeline stages) is
// encoded for the wire (swarm.proto's TensorCodec). All multi-byte values are little-endian.
//
//   kFp32          4 bytes per element, exact (every bit, NaN payloads included).
//   kBf16          2 bytes per element: the float rounded to bfloat16, to nearest, ties to even
//                  (as ATen's to(at::kBFloat16) for every value but NaN); inf stays inf, a finite
//                  value beyond bf16's range becomes inf, and every NaN becomes the quiet NaN
//                  0x7FC0 (ATen gives 0x7FC0 or 0xFFFF, depending on its code path). Decoding
//                  is exact.
//   kInt8Blockwise the elements in blocks of `block_size` (the last may be shorter); per block a
//                  float32 scale s = max |x| over the block, then one int8 per element,
//                  q = round-to-nearest-even(x / s * 127) in [-127, 127]; decoded as q * (s / 127).
//                  Size: 4 * ceil(n / block_size) + n bytes. Error per element: at most half a
//                  step, |x - decoded| <= s / 254, plus float rounding (a few ulps of s). A block
//                  of zeros has s = 0 and decodes to zeros. Inf and NaN cannot be carried (one
//                  would spoil its whole block's scale): Encode refuses them, naming the element.
//
// Decode checks everything it is given (codec, shape, block size, byte count, and for int8 each
// scale and value) and refuses bad input with kInvalidArgument naming what is wrong, so bytes
// from a peer can be passed to it as they come. Functions are pure and thread-safe.
#ifndef SHOAL_COMM_WIRE_CODEC_H_
#define SHOAL_COMM_WIRE_CODEC_H_

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "proto/swarm.pb.h"

namespace shoal::comm {

// The values are swarm.proto's TensorCodec numbers.
enum class WireCodec : int {
  kFp32 = 1,
  kBf16 = 2,
  kInt8Blockwise = 3,
};

// Elements per int8 block unless told otherwise, and the range a block size may take.
inline constexpr int kInt8BlockSize = 256;
inline constexpr int kMaxInt8BlockSize = 65536;
// The most dimensions a shape may have.
inline constexpr int kMaxWireDims = 8;

struct EncodedTensor {
  WireCodec codec = WireCodec::kFp32;
  std::vector<int64_t> shape;  // the tensor's sizes, outermost first
  int block_size = 0;          // kInt8Blockwise: elements per block; 0 otherwise
  std::string bytes;           // EncodedBytes(codec, numel, block_size) bytes
};

// "fp32", "bf16", "int8-blockwise".
const char* WireCodecName(WireCodec codec);

// The proto's enum and ours. kInvalidArgument for TENSOR_CODEC_UNSPECIFIED, _INT64 (token ids
// are not encoded here) and unknown numbers.
absl::StatusOr<WireCodec> WireCodecFromProto(v1::TensorCodec codec);
v1::TensorCodec ToProto(WireCodec codec);

// Bytes of `numel` elements in `codec` (block_size: kInt8Blockwise only, in
// [1, kMaxInt8BlockSize]).
int64_t EncodedBytes(WireCodec codec, int64_t numel, int block_size = kInt8BlockSize);

// Encodes a float32 CPU tensor of any shape (contiguous or not). kInvalidArgument: an undefined
// tensor, another dtype or device, more than kMaxWireDims dimensions, an unknown codec, a block
// size out of range, or (kInt8Blockwise) an inf or NaN element, named by its flat index.
absl::StatusOr<EncodedTensor> Encode(const at::Tensor& fp32, WireCodec codec,
                                     int block_size = kInt8BlockSize);

// Decodes `bytes` into a new contiguous float32 tensor of `shape`. kInvalidArgument, naming the
// problem: an unknown codec; a shape with more than kMaxWireDims dimensions, a negative
// dimension or more than 2^40 elements; a block size out of range (kInt8Blockwise; ignored
// otherwise); a byte count other than EncodedBytes (truncated or oversized input); an int8
// block whose scale is negative, inf or NaN, or that holds -128.
absl::StatusOr<at::Tensor> Decode(WireCodec codec, absl::Span<const int64_t> shape,
                                  absl::string_view bytes, int block_size = kInt8BlockSize);
absl::StatusOr<at::Tensor> Decode(const EncodedTensor& encoded);

// The TensorMeta a stage call declares for `encoded` (codec, shape, encoded_bytes, block_size).
v1::TensorMeta MetaOf(const EncodedTensor& encoded);

}  // namespace shoal::comm

#endif  // SHOAL_COMM_WIRE_CODEC_H_
