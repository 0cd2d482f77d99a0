#include "comm/wire_codec.h"

#include <ATen/ATen.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace shoal::comm {
namespace {

constexpr int64_t kMaxWireElements = int64_t{1} << 40;

uint32_t BitsOf(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

float FloatOf(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// Round to nearest, ties to even, on the bit pattern: adding 0x7FFF plus the lowest kept bit
// carries into bit 16 exactly when the dropped half is above one half, or is one half and the
// kept value is odd. The carry may ripple into the exponent, which is right (up to the next
// binade, or to inf past the largest bf16). NaN is not rounded but made the one quiet NaN.
uint16_t ToBf16(float x) {
  if (std::isnan(x)) return 0x7FC0;
  const uint32_t u = BitsOf(x);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

std::string ShapeText(absl::Span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

void PutU16(char* out, uint16_t v) {
  out[0] = static_cast<char>(v & 0xFF);
  out[1] = static_cast<char>(v >> 8);
}

uint16_t GetU16(const char* in) {
  return static_cast<uint16_t>(static_cast<uint8_t>(in[0]) |
                               (static_cast<uint16_t>(static_cast<uint8_t>(in[1])) << 8));
}

void PutF32(char* out, float x) {
  const uint32_t u = BitsOf(x);
  for (int i = 0; i < 4; ++i) out[i] = static_cast<char>((u >> (8 * i)) & 0xFF);
}

float GetF32(const char* in) {
  uint32_t u = 0;
  for (int i = 0; i < 4; ++i) u |= static_cast<uint32_t>(static_cast<uint8_t>(in[i])) << (8 * i);
  return FloatOf(u);
}

absl::Status CheckBlockSize(int block_size) {
  if (block_size < 1 || block_size > kMaxInt8BlockSize) {
    return absl::InvalidArgumentError(absl::StrCat("int8-blockwise block size ", block_size,
                                                   " is not in [1, ", kMaxInt8BlockSize, "]"));
  }
  return absl::OkStatus();
}

bool KnownCodec(WireCodec codec) {
  return codec == WireCodec::kFp32 || codec == WireCodec::kBf16 ||
         codec == WireCodec::kInt8Blockwise;
}

}  // namespace

const char* WireCodecName(WireCodec codec) {
  switch (codec) {
    case WireCodec::kFp32: return "fp32";
    case WireCodec::kBf16: return "bf16";
    case WireCodec::kInt8Blockwise: return "int8-blockwise";
  }
  return "unknown codec";
}

absl::StatusOr<WireCodec> WireCodecFromProto(v1::TensorCodec codec) {
  switch (codec) {
    case v1::TENSOR_CODEC_FP32: return WireCodec::kFp32;
    case v1::TENSOR_CODEC_BF16: return WireCodec::kBf16;
    case v1::TENSOR_CODEC_INT8_BLOCKWISE: return WireCodec::kInt8Blockwise;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor codec ", static_cast<int>(codec), " is not fp32, bf16 or int8-blockwise"));
  }
}

v1::TensorCodec ToProto(WireCodec codec) { return static_cast<v1::TensorCodec>(codec); }

int64_t EncodedBytes(WireCodec codec, int64_t numel, int block_size) {
  switch (codec) {
    case WireCodec::kFp32: return 4 * numel;
    case WireCodec::kBf16: return 2 * numel;
    case WireCodec::kInt8Blockwise: {
      const int64_t blocks = block_size > 0 ? (numel + block_size - 1) / block_size : 0;
      return 4 * blocks + numel;
    }
  }
  return -1;
}

absl::StatusOr<EncodedTensor> Encode(const at::Tensor& fp32, WireCodec codec, int block_size) {
  if (!fp32.defined() || fp32.scalar_type() != at::kFloat || !fp32.device().is_cpu()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "wire encode: the tensor must be a defined float32 CPU tensor, got ",
        fp32.defined() ? absl::StrCat(c10::toString(fp32.scalar_type()), " on ",
                                      fp32.device().str())
                       : std::string("an undefined one")));
  }
  if (fp32.dim() > kMaxWireDims) {
    return absl::InvalidArgumentError(absl::StrCat("wire encode: ", fp32.dim(),
                                                   " dimensions; at most ", kMaxWireDims));
  }
  if (!KnownCodec(codec)) {
    return absl::InvalidArgumentError(
        absl::StrCat("wire encode: unknown codec ", static_cast<int>(codec)));
  }
  if (codec == WireCodec::kInt8Blockwise) {
    if (absl::Status s = CheckBlockSize(block_size); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("wire encode: ", s.message()));
    }
  }
  const at::Tensor x = fp32.contiguous();
  const float* v = x.data_ptr<float>();
  const int64_t n = x.numel();
  EncodedTensor out;
  out.codec = codec;
  out.shape.assign(x.sizes().begin(), x.sizes().end());
  out.block_size = codec == WireCodec::kInt8Blockwise ? block_size : 0;
  out.bytes.resize(static_cast<size_t>(EncodedBytes(codec, n, block_size)));
  char* b = out.bytes.data();
  switch (codec) {
    case WireCodec::kFp32:
      for (int64_t i = 0; i < n; ++i) PutF32(b + 4 * i, v[i]);
      break;
    case WireCodec::kBf16:
      for (int64_t i = 0; i < n; ++i) PutU16(b + 2 * i, ToBf16(v[i]));
      break;
    case WireCodec::kInt8Blockwise:
      for (int64_t start = 0; start < n; start += block_size) {
        const int64_t len = std::min<int64_t>(block_size, n - start);
        float scale = 0;
        for (int64_t i = start; i < start + len; ++i) {
          if (!std::isfinite(v[i])) {
            return absl::InvalidArgumentError(absl::StrCat(
                "wire encode: int8-blockwise cannot carry inf or NaN; element ", i, " is ",
                v[i]));
          }
          scale = std::max(scale, std::fabs(v[i]));
        }
        PutF32(b, scale);
        b += 4;
        // In double, so that q is the integer nearest to x / s * 127 (ties to even), not a
        // neighbour that float rounding of the quotient would pick.
        const double factor = scale > 0 ? 127.0 / static_cast<double>(scale) : 0.0;
        for (int64_t i = start; i < start + len; ++i) {
          const double q = std::nearbyint(static_cast<double>(v[i]) * factor);
          *b++ = static_cast<char>(static_cast<int8_t>(std::max(-127.0, std::min(127.0, q))));
        }
      }
      break;
  }
  return out;
}

absl::StatusOr<at::Tensor> Decode(WireCodec codec, absl::Span<const int64_t> shape,
                                  absl::string_view bytes, int block_size) {
  if (!KnownCodec(codec)) {
    return absl::InvalidArgumentError(
        absl::StrCat("wire decode: unknown codec ", static_cast<int>(codec)));
  }
  const std::string what = absl::StrCat("wire decode of a ", WireCodecName(codec), " tensor of shape ",
                                        ShapeText(shape));
  if (shape.size() > static_cast<size_t>(kMaxWireDims)) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": ", shape.size(), " dimensions; at most ", kMaxWireDims));
  }
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return absl::InvalidArgumentError(absl::StrCat(what, ": a negative dimension"));
    if (d > 0 && n > kMaxWireElements / d) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": more than ", kMaxWireElements, " elements"));
    }
    n *= d;
  }
  if (codec == WireCodec::kInt8Blockwise) {
    if (absl::Status s = CheckBlockSize(block_size); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": ", s.message()));
    }
  }
  const int64_t want = EncodedBytes(codec, n, block_size);
  if (static_cast<int64_t>(bytes.size()) != want) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": needs ", want, " bytes, got ", bytes.size(),
        static_cast<int64_t>(bytes.size()) < want ? " (truncated)" : " (too many)"));
  }
  at::Tensor out = at::empty(at::IntArrayRef(shape.data(), shape.size()), at::kFloat);
  float* v = out.data_ptr<float>();
  const char* b = bytes.data();
  switch (codec) {
    case WireCodec::kFp32:
      for (int64_t i = 0; i < n; ++i) v[i] = GetF32(b + 4 * i);
      break;
    case WireCodec::kBf16:
      for (int64_t i = 0; i < n; ++i) v[i] = FloatOf(static_cast<uint32_t>(GetU16(b + 2 * i)) << 16);
      break;
    case WireCodec::kInt8Blockwise:
      for (int64_t start = 0, block = 0; start < n; start += block_size, ++block) {
        const int64_t len = std::min<int64_t>(block_size, n - start);
        const float scale = GetF32(b);
        b += 4;
        if (!std::isfinite(scale) || scale < 0) {
          return absl::InvalidArgumentError(
              absl::StrCat(what, ": block ", block, " has scale ", scale,
                           "; a scale is finite and >= 0"));
        }
        const float step = scale / 127.0f;
        for (int64_t i = start; i < start + len; ++i) {
          const int8_t q = static_cast<int8_t>(*b++);
          if (q == -128) {
            return absl::InvalidArgumentError(absl::StrCat(
                what, ": element ", i, " (block ", block, ") is -128, outside [-127, 127]"));
          }
          v[i] = static_cast<float>(q) * step;
        }
      }
      break;
  }
  return out;
}

absl::StatusOr<at::Tensor> Decode(const EncodedTensor& encoded) {
  return Decode(encoded.codec, encoded.shape, encoded.bytes, encoded.block_size);
}

v1::TensorMeta MetaOf(const EncodedTensor& encoded) {
  v1::TensorMeta meta;
  meta.set_codec(ToProto(encoded.codec));
  for (int64_t d : encoded.shape) meta.add_shape(d);
  meta.set_encoded_bytes(static_cast<int64_t>(encoded.bytes.size()));
  meta.set_block_size(encoded.codec == WireCodec::kInt8Blockwise ? encoded.block_size : 0);
  return meta;
}

}  // namespace shoal::comm
