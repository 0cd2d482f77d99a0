#include "comm/tensor_stream.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "comm/wire_codec.h"
#include "common/status.h"

namespace shoal::comm {
namespace {

// Elements of `shape`, or -1 when a dimension is negative or the count passes 2^40.
int64_t Elements(const google::protobuf::RepeatedField<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return -1;
    if (d != 0 && n > (int64_t{1} << 40) / d) return -1;
    n *= d;
  }
  return n;
}

}  // namespace

absl::StatusOr<WireTensor> EncodeForWire(const at::Tensor& tensor, v1::TensorCodec codec) {
  if (!tensor.defined()) return absl::InvalidArgumentError("wire tensor: no tensor");
  WireTensor out;
  if (codec == v1::TENSOR_CODEC_INT64) {
    if (tensor.scalar_type() != at::kLong) {
      return absl::InvalidArgumentError(absl::StrCat(
          "wire tensor: int64 codec for a ", at::toString(tensor.scalar_type()), " tensor"));
    }
    const at::Tensor c = tensor.contiguous();
    out.meta.set_codec(codec);
    for (int64_t d : c.sizes()) out.meta.add_shape(d);
    out.meta.set_encoded_bytes(static_cast<int64_t>(c.nbytes()));
    out.bytes.assign(static_cast<const char*>(c.data_ptr()), c.nbytes());
    return out;
  }
  SHOAL_ASSIGN_OR_RETURN(const WireCodec wc, WireCodecFromProto(codec));
  SHOAL_ASSIGN_OR_RETURN(EncodedTensor encoded, Encode(tensor, wc));
  out.meta = MetaOf(encoded);
  out.bytes = std::move(encoded.bytes);
  return out;
}

void AppendPieces(int index, absl::string_view bytes, std::vector<v1::TensorPiece>* out,
                  int64_t piece_bytes) {
  piece_bytes = std::clamp<int64_t>(piece_bytes, 1, kMaxPieceBytes);
  for (int64_t at = 0; at < static_cast<int64_t>(bytes.size()); at += piece_bytes) {
    v1::TensorPiece& p = out->emplace_back();
    p.set_tensor(index);
    p.set_offset(at);
    p.set_data(std::string(bytes.substr(at, piece_bytes)));
  }
}

absl::StatusOr<TensorAssembler> TensorAssembler::Create(std::vector<v1::TensorMeta> metas,
                                                        std::vector<std::string> names,
                                                        int64_t max_total_bytes) {
  if (metas.size() != names.size()) {
    return absl::InvalidArgumentError(absl::StrCat("stream declares ", metas.size(),
                                                   " tensors, expected ", names.size(), " (",
                                                   absl::StrJoin(names, ", "), ")"));
  }
  int64_t total = 0;
  for (size_t i = 0; i < metas.size(); ++i) {
    const v1::TensorMeta& m = metas[i];
    const std::string& name = names[i];
    if (m.shape_size() > kMaxWireDims) {
      return absl::InvalidArgumentError(absl::StrCat(name, ": ", m.shape_size(),
                                                     " dimensions, at most ", kMaxWireDims));
    }
    const int64_t n = Elements(m.shape());
    if (n < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          name, ": shape (", absl::StrJoin(m.shape(), ", "), ") has a negative dimension or "
          "too many elements"));
    }
    int64_t want = 0;
    if (m.codec() == v1::TENSOR_CODEC_INT64) {
      want = 8 * n;
    } else {
      absl::StatusOr<WireCodec> wc = WireCodecFromProto(m.codec());
      if (!wc.ok()) return absl::InvalidArgumentError(absl::StrCat(name, ": ", wc.status().message()));
      const int block = *wc == WireCodec::kInt8Blockwise ? m.block_size() : kInt8BlockSize;
      if (*wc == WireCodec::kInt8Blockwise && (block < 1 || block > kMaxInt8BlockSize)) {
        return absl::InvalidArgumentError(absl::StrCat(name, ": int8 block size ", m.block_size(),
                                                       ", not in [1, ", kMaxInt8BlockSize, "]"));
      }
      want = EncodedBytes(*wc, n, block);
    }
    if (m.encoded_bytes() != want) {
      return absl::InvalidArgumentError(absl::StrCat(name, ": declares ", m.encoded_bytes(),
                                                     " encoded bytes; its codec and shape make ",
                                                     want));
    }
    total += want;
    if (total > max_total_bytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "stream declares more than ", max_total_bytes, " bytes (at ", name, ")"));
    }
  }
  TensorAssembler a;
  a.metas_ = std::move(metas);
  a.names_ = std::move(names);
  a.bytes_.resize(a.metas_.size());
  for (size_t i = 0; i < a.metas_.size(); ++i) a.bytes_[i].reserve(a.metas_[i].encoded_bytes());
  // Tensors of no bytes are complete before any piece.
  while (a.current_ < a.metas_.size() && a.metas_[a.current_].encoded_bytes() == 0) ++a.current_;
  return a;
}

absl::Status TensorAssembler::Add(const v1::TensorPiece& piece) {
  if (current_ >= metas_.size()) {
    return absl::InvalidArgumentError(absl::StrCat("a piece of tensor ", piece.tensor(),
                                                   " after every declared byte arrived"));
  }
  const std::string& name = names_[current_];
  if (piece.tensor() != static_cast<int>(current_)) {
    return absl::InvalidArgumentError(absl::StrCat("a piece of tensor ", piece.tensor(),
                                                   " while ", name, " (tensor ", current_,
                                                   ") is in progress"));
  }
  std::string& got = bytes_[current_];
  const int64_t want = metas_[current_].encoded_bytes();
  if (piece.offset() != static_cast<int64_t>(got.size())) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": piece at offset ", piece.offset(),
                                                   ", expected ", got.size()));
  }
  const int64_t size = static_cast<int64_t>(piece.data().size());
  if (size < 1 || size > kMaxPieceBytes) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": piece of ", size,
                                                   " bytes, not in [1, ", kMaxPieceBytes, "]"));
  }
  if (static_cast<int64_t>(got.size()) + size > want) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": pieces pass the declared ", want,
                                                   " bytes"));
  }
  got.append(piece.data());
  while (current_ < metas_.size() &&
         static_cast<int64_t>(bytes_[current_].size()) == metas_[current_].encoded_bytes()) {
    ++current_;
  }
  return absl::OkStatus();
}

absl::Status TensorAssembler::CheckComplete() const {
  if (current_ >= metas_.size()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "the stream ended with ", names_[current_], " at ", bytes_[current_].size(), " of ",
      metas_[current_].encoded_bytes(), " bytes"));
}

absl::StatusOr<at::Tensor> TensorAssembler::Take(int index) const {
  if (index < 0 || static_cast<size_t>(index) >= metas_.size()) {
    return absl::OutOfRangeError(absl::StrCat("no tensor ", index, " in the stream"));
  }
  SHOAL_RETURN_IF_ERROR(CheckComplete());
  const v1::TensorMeta& m = metas_[index];
  std::vector<int64_t> shape(m.shape().begin(), m.shape().end());
  if (m.codec() == v1::TENSOR_CODEC_INT64) {
    at::Tensor t = at::empty(shape, at::kLong);
    std::memcpy(t.data_ptr(), bytes_[index].data(), bytes_[index].size());
    return t;
  }
  SHOAL_ASSIGN_OR_RETURN(const WireCodec wc, WireCodecFromProto(m.codec()));
  absl::StatusOr<at::Tensor> t = Decode(wc, shape, bytes_[index],
                                        wc == WireCodec::kInt8Blockwise ? m.block_size()
                                                                        : kInt8BlockSize);
  if (!t.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(names_[index], ": ", t.status().message()));
  }
  return t;
}

}  // namespace shoal::comm
