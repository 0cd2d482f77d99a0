// comm/wire_codec: each codec against an independent definition. fp32: the bits themselves;
// bf16: ATen's own conversion (to(at::kBFloat16)) and hand-made ties; int8-blockwise: the
// closed-form error bound from each block's max |x|, computed here; and every way Decode can be
// handed bad bytes.
#include "comm/wire_codec.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "absl/strings/match.h"

namespace shoal::comm {
namespace {

float FromBits(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

at::Tensor TensorOf(const std::vector<float>& v) {
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::kFloat);
  if (!v.empty()) std::memcpy(t.data_ptr<float>(), v.data(), v.size() * sizeof(float));
  return t;
}

bool SameBytes(const at::Tensor& a, const at::Tensor& b) {
  return a.nbytes() == b.nbytes() && std::memcmp(a.contiguous().data_ptr(),
                                                 b.contiguous().data_ptr(), a.nbytes()) == 0;
}

// Values over the whole float range: random bit patterns (any exponent, denormals, inf, NaN)
// and the special cases.
std::vector<float> AllKindsOfFloats() {
  std::vector<float> v = {0.0f, -0.0f, 1.0f, -1.0f, std::numeric_limits<float>::infinity(),
                          -std::numeric_limits<float>::infinity(),
                          std::numeric_limits<float>::quiet_NaN(),
                          -std::numeric_limits<float>::quiet_NaN(),
                          FromBits(0x7F800001),  // a signalling NaN
                          std::numeric_limits<float>::max(), std::numeric_limits<float>::lowest(),
                          std::numeric_limits<float>::min(),
                          std::numeric_limits<float>::denorm_min(), FromBits(0x3F808000),
                          FromBits(0x3F818000), FromBits(0x7F7F8000), FromBits(0x7F7F7FFF)};
  uint32_t x = 12345;
  for (int i = 0; i < 100000; ++i) {
    x = x * 1664525u + 1013904223u;
    v.push_back(FromBits(x));
  }
  return v;
}

TEST(WireCodecTest, Fp32RoundTripKeepsEveryBit) {
  const at::Tensor t = TensorOf(AllKindsOfFloats()).view({-1, 1});
  auto e = Encode(t, WireCodec::kFp32);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->bytes.size(), 4 * static_cast<size_t>(t.numel()));
  EXPECT_EQ(e->shape, (std::vector<int64_t>{t.size(0), 1}));
  // Little-endian on the wire, as this (x86/ARM) host stores floats.
  EXPECT_EQ(std::memcmp(e->bytes.data(), t.data_ptr(), t.nbytes()), 0);
  auto d = Decode(*e);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->sizes(), t.sizes());
  EXPECT_TRUE(SameBytes(*d, t));
}

TEST(WireCodecTest, Bf16EqualsATensConversion) {
  const std::vector<float> values = AllKindsOfFloats();
  const at::Tensor t = TensorOf(values);
  auto e = Encode(t, WireCodec::kBf16);
  ASSERT_TRUE(e.ok()) << e.status();
  const at::Tensor aten = t.to(at::kBFloat16);
  ASSERT_EQ(e->bytes.size(), aten.nbytes());
  const uint16_t* want = static_cast<const uint16_t*>(aten.data_ptr());
  auto is_nan = [](uint16_t b) { return (b & 0x7F80) == 0x7F80 && (b & 0x007F) != 0; };
  int64_t differ = 0, first = -1, nans = 0;
  for (int64_t i = 0; i < t.numel(); ++i) {
    uint16_t got;
    std::memcpy(&got, e->bytes.data() + 2 * i, 2);
    if (std::isnan(values[static_cast<size_t>(i)])) {
      // ATen writes 0xFFFF in its vectorized path and 0x7FC0 in its scalar one; the codec
      // always gives 0x7FC0.
      ++nans;
      ASSERT_TRUE(is_nan(want[i])) << i;
      ASSERT_EQ(got, 0x7FC0) << i;
    } else if (got != want[i]) {
      if (first < 0) first = i;
      ++differ;
    }
  }
  EXPECT_GT(nans, 100);  // random bit patterns hold NaNs in several encodings
  EXPECT_EQ(differ, 0) << "first at " << first << ": " << values[static_cast<size_t>(first)];
  // Decoding is exact: the bf16 value, widened (compared where ATen's value is not a NaN).
  auto d = Decode(*e);
  ASSERT_TRUE(d.ok()) << d.status();
  const at::Tensor widened = aten.to(at::kFloat);
  const at::Tensor numbers = ~at::isnan(t);
  EXPECT_TRUE(SameBytes(d->masked_select(numbers), widened.masked_select(numbers)));
  EXPECT_TRUE(at::isnan(*d).equal(at::isnan(t)));
}

// Halfway cases by hand: the bf16 neighbours of 1.0 are 0x3F80 and 0x3F81.
TEST(WireCodecTest, Bf16TiesRoundToEven) {
  auto bf16_of = [](uint32_t bits) {
    auto e = Encode(TensorOf({FromBits(bits)}), WireCodec::kBf16);
    uint16_t out = 0;
    if (e.ok()) std::memcpy(&out, e->bytes.data(), 2);
    return out;
  };
  EXPECT_EQ(bf16_of(0x3F808000), 0x3F80);  // halfway, 0x3F80 is even: down
  EXPECT_EQ(bf16_of(0x3F818000), 0x3F82);  // halfway, 0x3F81 is odd: up
  EXPECT_EQ(bf16_of(0x3F808001), 0x3F81);  // above halfway: up
  EXPECT_EQ(bf16_of(0x3F807FFF), 0x3F80);  // below halfway: down
  EXPECT_EQ(bf16_of(0x7F7F8000), 0x7F80);  // halfway above the largest bf16, odd: up, to inf
  EXPECT_EQ(bf16_of(0xFF800000), 0xFF80);  // -inf stays -inf
  EXPECT_EQ(bf16_of(0xFFC00001), 0x7FC0);  // any NaN: the quiet NaN
}

// Every element is within half a step of its block's scale, s / 254, plus float rounding.
TEST(WireCodecTest, Int8ErrorIsWithinHalfAStepOfItsBlock) {
  for (int block : {1, 7, 256, 1000}) {
    // 2500 values: several blocks and a shorter last one; magnitudes vary by block.
    std::vector<float> v(2500);
    uint32_t x = 99;
    for (size_t i = 0; i < v.size(); ++i) {
      x = x * 1664525u + 1013904223u;
      const float unit = static_cast<float>(x >> 8) / static_cast<float>(1 << 24) * 2 - 1;
      v[i] = std::ldexp(unit, static_cast<int>((i / 300) % 9) - 4);
    }
    const at::Tensor t = TensorOf(v).view({50, 50});
    auto e = Encode(t, WireCodec::kInt8Blockwise, block);
    ASSERT_TRUE(e.ok()) << e.status();
    const int64_t blocks = (2500 + block - 1) / block;
    EXPECT_EQ(static_cast<int64_t>(e->bytes.size()), 4 * blocks + 2500);
    EXPECT_EQ(e->block_size, block);
    auto d = Decode(*e);
    ASSERT_TRUE(d.ok()) << d.status();
    ASSERT_EQ(d->sizes(), t.sizes());
    const float* got = d->data_ptr<float>();
    double worst = 0;  // the largest error, in units of the block's s / 254
    for (int64_t b = 0; b < blocks; ++b) {
      const size_t lo = static_cast<size_t>(b * block);
      const size_t hi = std::min(v.size(), lo + static_cast<size_t>(block));
      float s = 0;
      for (size_t i = lo; i < hi; ++i) s = std::max(s, std::fabs(v[i]));
      for (size_t i = lo; i < hi; ++i) {
        const double err = std::fabs(static_cast<double>(v[i]) - got[i]);
        ASSERT_LE(err, s / 254.0 + s * 1e-6) << "block size " << block << ", element " << i;
        if (s > 0) worst = std::max(worst, err / (s / 254.0));
      }
    }
    // The bound is tight: some element comes close to half a step (not a loose coding).
    if (block > 1) {
      EXPECT_GT(worst, 0.9) << "block size " << block;
    }
  }
}

TEST(WireCodecTest, Int8ZeroBlocksDecodeToZeros) {
  std::vector<float> v(600, 0.0f);
  for (size_t i = 256; i < 512; ++i) v[i] = static_cast<float>(i) - 300.0f;  // block 1 only
  auto e = Encode(TensorOf(v), WireCodec::kInt8Blockwise);
  ASSERT_TRUE(e.ok()) << e.status();
  float scale0, scale2;
  std::memcpy(&scale0, e->bytes.data(), 4);
  std::memcpy(&scale2, e->bytes.data() + 2 * (4 + 256), 4);
  EXPECT_EQ(scale0, 0.0f);
  EXPECT_EQ(scale2, 0.0f);
  auto d = Decode(*e);
  ASSERT_TRUE(d.ok()) << d.status();
  const float* got = d->data_ptr<float>();
  for (size_t i = 0; i < 256; ++i) ASSERT_EQ(got[i], 0.0f) << i;
  for (size_t i = 512; i < 600; ++i) ASSERT_EQ(got[i], 0.0f) << i;
}

TEST(WireCodecTest, Int8RefusesInfAndNanNamingTheElement) {
  for (float bad : {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                    std::numeric_limits<float>::quiet_NaN()}) {
    std::vector<float> v(300, 1.0f);
    v[261] = bad;
    auto e = Encode(TensorOf(v), WireCodec::kInt8Blockwise);
    EXPECT_TRUE(absl::IsInvalidArgument(e.status())) << e.status();
    EXPECT_TRUE(absl::StrContains(e.status().message(), "element 261")) << e.status();
  }
}

TEST(WireCodecTest, EmptyAndScalarTensorsRoundTrip) {
  for (WireCodec c : {WireCodec::kFp32, WireCodec::kBf16, WireCodec::kInt8Blockwise}) {
    const at::Tensor empty = at::empty({0, 5}, at::kFloat);
    auto e = Encode(empty, c);
    ASSERT_TRUE(e.ok()) << e.status();
    EXPECT_EQ(e->bytes.size(), 0u);
    auto d = Decode(*e);
    ASSERT_TRUE(d.ok()) << d.status();
    EXPECT_EQ(d->sizes(), empty.sizes());
    const at::Tensor scalar = at::scalar_tensor(2.0, at::kFloat);  // exact in every codec
    auto es = Encode(scalar, c);
    ASSERT_TRUE(es.ok()) << es.status();
    auto ds = Decode(*es);
    ASSERT_TRUE(ds.ok()) << ds.status();
    EXPECT_EQ(ds->dim(), 0);
    EXPECT_EQ(ds->item<float>(), 2.0f) << WireCodecName(c);
  }
}

TEST(WireCodecTest, NonContiguousInputIsEncodedInLogicalOrder) {
  const at::Tensor t = at::arange(12, at::kFloat).view({3, 4}).t();  // (4, 3), strided
  auto e = Encode(t, WireCodec::kFp32);
  ASSERT_TRUE(e.ok()) << e.status();
  auto d = Decode(*e);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_TRUE(at::equal(*d, t));
}

TEST(WireCodecTest, EncodeRefusesWhatItCannotCarry) {
  EXPECT_TRUE(absl::IsInvalidArgument(Encode(at::Tensor(), WireCodec::kFp32).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(Encode(at::ones({3}, at::kDouble), WireCodec::kFp32).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(
      Encode(at::ones({3}), static_cast<WireCodec>(9)).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(Encode(at::ones({3}), WireCodec::kInt8Blockwise, 0).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(
      Encode(at::ones({1, 1, 1, 1, 1, 1, 1, 1, 1}), WireCodec::kFp32).status()));
}

// Bad bytes from a peer: refused with kInvalidArgument and a message that says what is wrong.
TEST(WireCodecTest, DecodeRefusesBadInputNamingIt) {
  auto expect_refused = [](const absl::StatusOr<at::Tensor>& d, const std::string& part) {
    EXPECT_TRUE(absl::IsInvalidArgument(d.status())) << d.status();
    EXPECT_TRUE(absl::StrContains(d.status().message(), part))
        << "'" << d.status().message() << "' lacks '" << part << "'";
  };
  const std::vector<int64_t> shape{2, 300};
  for (WireCodec c : {WireCodec::kFp32, WireCodec::kBf16, WireCodec::kInt8Blockwise}) {
    auto e = Encode(at::ones({2, 300}), c);
    ASSERT_TRUE(e.ok());
    const std::string& b = e->bytes;
    expect_refused(Decode(c, shape, absl::string_view(b).substr(0, b.size() - 1)), "truncated");
    expect_refused(Decode(c, shape, b + "x"), "too many");
    expect_refused(Decode(c, {2, 301}, b), "[2, 301]");
    expect_refused(Decode(c, {-2, -300}, b), "negative dimension");
    expect_refused(Decode(c, {1, 1, 1, 1, 1, 1, 1, 1, 600}, b), "dimensions");
    expect_refused(Decode(c, {int64_t{1} << 30, int64_t{1} << 30}, b), "elements");
  }
  expect_refused(Decode(static_cast<WireCodec>(7), shape, ""), "unknown codec");
  auto e = Encode(at::ones({2, 300}), WireCodec::kInt8Blockwise);
  ASSERT_TRUE(e.ok());
  expect_refused(Decode(WireCodec::kInt8Blockwise, shape, e->bytes, 0), "block size 0");
  // A different block size changes the expected size: refused as the wrong byte count.
  expect_refused(Decode(WireCodec::kInt8Blockwise, shape, e->bytes, 128), "needs");
  std::string bad_scale = e->bytes;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(&bad_scale[4 + 256], &nan, 4);  // block 1's scale
  expect_refused(Decode(WireCodec::kInt8Blockwise, shape, bad_scale), "block 1 has scale");
  std::string negative = e->bytes;
  const float minus = -1.0f;
  std::memcpy(&negative[0], &minus, 4);
  expect_refused(Decode(WireCodec::kInt8Blockwise, shape, negative), "block 0 has scale -1");
  std::string min_int8 = e->bytes;
  min_int8[4 + 10] = static_cast<char>(-128);
  expect_refused(Decode(WireCodec::kInt8Blockwise, shape, min_int8), "element 10");
}

TEST(WireCodecTest, SizesAndProtoNumbersAreSwarmProtos) {
  EXPECT_EQ(EncodedBytes(WireCodec::kFp32, 10), 40);
  EXPECT_EQ(EncodedBytes(WireCodec::kBf16, 10), 20);
  EXPECT_EQ(EncodedBytes(WireCodec::kInt8Blockwise, 513, 256), 3 * 4 + 513);
  EXPECT_EQ(ToProto(WireCodec::kFp32), v1::TENSOR_CODEC_FP32);
  EXPECT_EQ(ToProto(WireCodec::kBf16), v1::TENSOR_CODEC_BF16);
  EXPECT_EQ(ToProto(WireCodec::kInt8Blockwise), v1::TENSOR_CODEC_INT8_BLOCKWISE);
  for (v1::TensorCodec c : {v1::TENSOR_CODEC_FP32, v1::TENSOR_CODEC_BF16,
                            v1::TENSOR_CODEC_INT8_BLOCKWISE}) {
    auto w = WireCodecFromProto(c);
    ASSERT_TRUE(w.ok());
    EXPECT_EQ(ToProto(*w), c);
  }
  EXPECT_TRUE(absl::IsInvalidArgument(WireCodecFromProto(v1::TENSOR_CODEC_INT64).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(WireCodecFromProto(v1::TENSOR_CODEC_UNSPECIFIED).status()));
  auto e = Encode(at::ones({3, 7}), WireCodec::kInt8Blockwise, 4);
  ASSERT_TRUE(e.ok());
  const v1::TensorMeta meta = MetaOf(*e);
  EXPECT_EQ(meta.codec(), v1::TENSOR_CODEC_INT8_BLOCKWISE);
  EXPECT_EQ(meta.shape_size(), 2);
  EXPECT_EQ(meta.encoded_bytes(), 6 * 4 + 21);
  EXPECT_EQ(meta.block_size(), 4);
}

}  // namespace
}  // namespace shoal::comm
