// Tests for parallel/demo_codec.h against references computed here, independently of the codec:
// the chunk rule's worked examples, the DCT basis against its closed
// form, tile coefficients against a plain double-loop 2-D DCT, the orthonormal round trip and
// per-tile norms, top-k on hand-built tiles, error feedback, scatter-mean semantics and its
// independence of the thread count, the wire dtype, the byte formula, bad input, and the DeMo
// step (signSGD when everything is sent, moves of 0 or lr, error feedback over steps).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "absl/status/status.h"
#include "parallel/demo_codec.h"
#include "tests/aten_test_util.h"

namespace shoal::parallel {
namespace {

using shoal::testing::ThreadCountGuard;

DemoCodec MakeCodec(std::vector<int64_t> shape, int chunk = 64, int topk = 32,
                    at::ScalarType wire = at::kFloat) {
  auto codec = DemoCodec::Create(std::move(shape), DemoCodecOptions{chunk, topk, wire});
  EXPECT_TRUE(codec.ok()) << codec.status();
  return *std::move(codec);
}

// The closed form of the orthonormal DCT-II, written out again here.
double ClosedFormDct(int n, int k, int j) {
  const double pi = 3.14159265358979323846;
  const double alpha = k == 0 ? std::sqrt(1.0 / n) : std::sqrt(2.0 / n);
  return alpha * std::cos(pi * (2 * j + 1) * k / (2.0 * n));
}

// One worker's selection built by hand: (tiles, k) indices and fp32 values.
DemoSelection HandSelection(const std::vector<std::vector<int16_t>>& idx,
                            const std::vector<std::vector<float>>& val) {
  const int64_t tiles = static_cast<int64_t>(idx.size());
  const int64_t k = static_cast<int64_t>(idx[0].size());
  std::vector<int16_t> flat_idx;
  std::vector<float> flat_val;
  for (int64_t t = 0; t < tiles; ++t) {
    flat_idx.insert(flat_idx.end(), idx[t].begin(), idx[t].end());
    flat_val.insert(flat_val.end(), val[t].begin(), val[t].end());
  }
  return DemoSelection{at::tensor(flat_idx, at::kShort).reshape({tiles, k}),
                       at::tensor(flat_val, at::kFloat).reshape({tiles, k})};
}

TEST(DemoChunkLengthTest, WorkedExamples) {
  EXPECT_EQ(DemoChunkLength(2048, 64), 64);
  EXPECT_EQ(DemoChunkLength(16384, 64), 64);
  EXPECT_EQ(DemoChunkLength(50304, 64), 64);
  EXPECT_EQ(DemoChunkLength(50280, 64), 60);
  EXPECT_EQ(DemoChunkLength(48, 64), 48);
  EXPECT_EQ(DemoChunkLength(97, 64), 1);
  EXPECT_EQ(DemoChunkLength(100, 64), 50);
  EXPECT_EQ(DemoChunkLength(64, 64), 64);
  EXPECT_EQ(DemoChunkLength(1, 64), 1);
  EXPECT_EQ(DemoChunkLength(0, 64), 0);
  EXPECT_EQ(DemoChunkLength(64, 0), 0);
}

TEST(DemoDctBasisTest, MatchesClosedFormAndIsOrthonormal) {
  for (int n : {1, 2, 7, 48, 60, 64}) {
    const at::Tensor c = DemoDctBasis(n);
    ASSERT_EQ(c.scalar_type(), at::kDouble);
    ASSERT_EQ(c.sizes(), at::IntArrayRef({n, n}));
    const auto a = c.accessor<double, 2>();
    double worst = 0;
    for (int k = 0; k < n; ++k) {
      for (int j = 0; j < n; ++j) worst = std::max(worst, std::abs(a[k][j] - ClosedFormDct(n, k, j)));
    }
    EXPECT_LT(worst, 1e-14) << "n = " << n;
    // C·Cᵀ = I, computed with plain loops.
    double off = 0;
    for (int r = 0; r < n; ++r) {
      for (int s = 0; s < n; ++s) {
        double dot = 0;
        for (int j = 0; j < n; ++j) dot += a[r][j] * a[s][j];
        off = std::max(off, std::abs(dot - (r == s ? 1.0 : 0.0)));
      }
    }
    EXPECT_LT(off, 1e-12) << "n = " << n;
  }
}

TEST(DemoCodecTest, GeometryOfEachRank) {
  const DemoCodec d2 = MakeCodec({100, 48});
  EXPECT_EQ(d2.n1(), 50);
  EXPECT_EQ(d2.n2(), 48);
  EXPECT_EQ(d2.tiles(), 2);
  EXPECT_EQ(d2.tile_numel(), 2400);
  const DemoCodec d1 = MakeCodec({300});
  EXPECT_EQ(d1.rows(), 1);
  EXPECT_EQ(d1.n1(), 1);
  EXPECT_EQ(d1.n2(), 60);
  EXPECT_EQ(d1.tiles(), 5);
  EXPECT_EQ(d1.k(), 32);
  const DemoCodec d4 = MakeCodec({8, 3, 2, 5});  // flattened to (8, 30)
  EXPECT_EQ(d4.rows(), 8);
  EXPECT_EQ(d4.cols(), 30);
  EXPECT_EQ(d4.n1(), 8);
  EXPECT_EQ(d4.n2(), 30);
  EXPECT_EQ(d4.tiles(), 1);
  const DemoCodec d0 = MakeCodec({});
  EXPECT_EQ(d0.tiles(), 1);
  EXPECT_EQ(d0.tile_numel(), 1);
  EXPECT_EQ(d0.k(), 1);
}

// Every coefficient of every tile against a plain double-loop 2-D DCT of that tile:
// coef[t][k·n2 + l] = Σ_i Σ_j C1[k,i] C2[l,j] x[a·n1 + i, b·n2 + j], tile t = a·(cols/n2) + b.
TEST(DemoCodecTest, EncodeMatchesLoopDct) {
  at::manual_seed(1);
  const int64_t rows = 12, cols = 20;
  const DemoCodec codec = MakeCodec({rows, cols}, /*chunk=*/8);  // n1 = 6 (12 % 8 != 0), n2 = 5
  ASSERT_EQ(codec.n1(), 6);
  ASSERT_EQ(codec.n2(), 5);
  const at::Tensor x = at::randn({rows, cols}, at::kDouble);
  const at::Tensor coefs = codec.Encode(x);
  ASSERT_EQ(coefs.scalar_type(), at::kDouble);
  ASSERT_EQ(coefs.sizes(), at::IntArrayRef({8, 30}));
  const auto xa = x.accessor<double, 2>();
  const auto ca = coefs.accessor<double, 2>();
  const int n1 = 6, n2 = 5;
  double worst = 0;
  for (int a = 0; a < rows / n1; ++a) {
    for (int b = 0; b < cols / n2; ++b) {
      const int t = a * (cols / n2) + b;
      for (int k = 0; k < n1; ++k) {
        for (int l = 0; l < n2; ++l) {
          double expect = 0;
          for (int i = 0; i < n1; ++i) {
            for (int j = 0; j < n2; ++j) {
              expect += ClosedFormDct(n1, k, i) * ClosedFormDct(n2, l, j) * xa[a * n1 + i][b * n2 + j];
            }
          }
          worst = std::max(worst, std::abs(ca[t][k * n2 + l] - expect));
        }
      }
    }
  }
  EXPECT_LT(worst, 1e-12);
}

TEST(DemoCodecTest, OneDimensionalEncodeMatchesLoopDct) {
  at::manual_seed(2);
  const DemoCodec codec = MakeCodec({100});  // n = 50, two tiles
  const at::Tensor x = at::randn({100}, at::kDouble);
  const at::Tensor coefs = codec.Encode(x);
  ASSERT_EQ(coefs.sizes(), at::IntArrayRef({2, 50}));
  const auto xa = x.accessor<double, 1>();
  const auto ca = coefs.accessor<double, 2>();
  double worst = 0;
  for (int t = 0; t < 2; ++t) {
    for (int k = 0; k < 50; ++k) {
      double expect = 0;
      for (int j = 0; j < 50; ++j) expect += ClosedFormDct(50, k, j) * xa[t * 50 + j];
      worst = std::max(worst, std::abs(ca[t][k] - expect));
    }
  }
  EXPECT_LT(worst, 1e-12);
}

TEST(DemoCodecTest, RoundTripAndTileNormsInDouble) {
  at::manual_seed(3);
  const std::vector<std::vector<int64_t>> shapes = {
      {100, 48}, {128, 192}, {300}, {97}, {2048}, {7, 130}, {6, 4, 5}, {64, 64}, {}};
  for (const auto& shape : shapes) {
    SCOPED_TRACE(::testing::PrintToString(shape));
    const DemoCodec codec = MakeCodec(shape);
    const at::Tensor x = at::randn(shape, at::kDouble);
    const at::Tensor coefs = codec.Encode(x);
    const at::Tensor back = codec.Decode(coefs);
    ASSERT_EQ(back.sizes(), x.sizes());
    ASSERT_EQ(back.scalar_type(), at::kDouble);
    EXPECT_LT((back - x).abs().max().item<double>(), 1e-10);
    // Per-tile L2 norm, the tile cut out of the (rows, cols) matrix view by slicing.
    const at::Tensor m = x.reshape({codec.rows(), codec.cols()});
    const int64_t per_row = codec.cols() / codec.n2();
    for (int64_t t = 0; t < codec.tiles(); ++t) {
      const int64_t a = t / per_row, b = t % per_row;
      const at::Tensor tile = m.slice(0, a * codec.n1(), (a + 1) * codec.n1())
                                  .slice(1, b * codec.n2(), (b + 1) * codec.n2());
      EXPECT_NEAR(tile.norm().item<double>(), coefs[t].norm().item<double>(), 1e-10) << "tile " << t;
    }
  }
}

TEST(DemoCodecTest, Float32RoundTripAndDtypes) {
  at::manual_seed(4);
  const DemoCodec codec = MakeCodec({128, 96});
  const at::Tensor x = at::randn({128, 96});
  const at::Tensor coefs = codec.Encode(x);
  EXPECT_EQ(coefs.scalar_type(), at::kFloat);
  const at::Tensor back = codec.Decode(coefs);
  EXPECT_EQ(back.scalar_type(), at::kFloat);
  EXPECT_LT((back - x).abs().max().item<float>(), 1e-5);
  // A non-contiguous input (a transposed view) encodes like its contiguous copy.
  const at::Tensor xt = at::randn({96, 128}).t();
  EXPECT_TRUE(at::equal(codec.Encode(xt), codec.Encode(xt.contiguous())));
}

TEST(DemoCodecTest, TopKTakesLargestMagnitudesTiesToLowerIndex) {
  // One tile of 8: |values| 0.5 3 2 3 2 0.1 1 0.5.
  const at::Tensor coefs =
      at::tensor({0.5f, -3.f, 2.f, 3.f, -2.f, 0.1f, 1.f, -0.5f}).reshape({1, 8});
  auto indices_for = [&](int topk) {
    const DemoCodec codec = MakeCodec({8}, /*chunk=*/8, topk);
    const DemoSelection s = codec.Select(coefs);
    EXPECT_EQ(s.indices.scalar_type(), at::kShort);
    EXPECT_EQ(s.values.scalar_type(), at::kFloat);
    std::vector<int> idx;
    for (int64_t j = 0; j < s.indices.size(1); ++j) {
      idx.push_back(s.indices[0][j].item<int>());
      EXPECT_EQ(s.values[0][j].item<float>(), coefs[0][idx.back()].item<float>());
    }
    return idx;
  };
  EXPECT_EQ(indices_for(1), (std::vector<int>{1}));           // 3 at 1 and 3 at 3: lower wins
  EXPECT_EQ(indices_for(2), (std::vector<int>{1, 3}));
  EXPECT_EQ(indices_for(3), (std::vector<int>{1, 2, 3}));     // 2 at 2 beats 2 at 4
  EXPECT_EQ(indices_for(5), (std::vector<int>{1, 2, 3, 4, 6}));
  EXPECT_EQ(indices_for(6), (std::vector<int>{0, 1, 2, 3, 4, 6}));  // 0.5 at 0 beats 0.5 at 7
  EXPECT_EQ(indices_for(8), (std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_EQ(indices_for(100), (std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7}));  // k clamps to 8
}

TEST(DemoCodecTest, TopKOnRandomTilesAgreesWithSortReference) {
  at::manual_seed(5);
  const DemoCodec codec = MakeCodec({128, 192}, 64, 32);
  // Rounded to a coarse grid so that ties are common.
  const at::Tensor coefs = (at::randn({codec.tiles(), codec.tile_numel()}) * 4).round();
  const DemoSelection s = codec.Select(coefs);
  const auto ca = coefs.accessor<float, 2>();
  for (int64_t t = 0; t < codec.tiles(); ++t) {
    std::vector<int> order(codec.tile_numel());
    for (int i = 0; i < static_cast<int>(order.size()); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return std::abs(ca[t][a]) > std::abs(ca[t][b]); });
    order.resize(codec.k());
    std::sort(order.begin(), order.end());
    for (int64_t j = 0; j < codec.k(); ++j) {
      ASSERT_EQ(s.indices[t][j].item<int>(), order[j]) << "tile " << t << " slot " << j;
    }
  }
}

TEST(DemoCodecTest, ErrorFeedbackConservesTheBuffer) {
  at::manual_seed(6);
  for (at::ScalarType wire : {at::kFloat, at::kBFloat16, at::kHalf}) {
    SCOPED_TRACE(c10::toString(wire));
    const DemoCodec codec = MakeCodec({128, 96}, 64, 32, wire);
    const at::Tensor delta = at::randn({128, 96});
    const at::Tensor coefs = codec.Encode(delta);
    const DemoSelection s = codec.Select(coefs);
    const at::Tensor dense = codec.Decompress(s, at::kFloat);
    const at::Tensor sent = codec.Decode(dense);
    const at::Tensor residual = delta - sent;
    EXPECT_TRUE(at::allclose(residual + sent, delta, 1e-6, 1e-5));
    // In coefficient space the residual keeps every unsent coefficient and only the rounding
    // error of the sent ones.
    const at::Tensor left = codec.Encode(residual);
    const at::Tensor sent_mask = dense != 0;
    EXPECT_TRUE(at::allclose(left.masked_select(~sent_mask), coefs.masked_select(~sent_mask), 0,
                             1e-5));
    const double tol = wire == at::kFloat ? 1e-5 : 0.02;
    EXPECT_LT(left.masked_select(sent_mask).abs().max().item<float>(),
              tol * coefs.abs().max().item<float>());
  }
}

TEST(DemoCodecTest, KeepingEverythingInFloat32LeavesNoResidual) {
  at::manual_seed(7);
  for (const std::vector<int64_t>& shape : std::vector<std::vector<int64_t>>{{64, 64}, {300}, {100, 48}}) {
    const DemoCodec codec = MakeCodec(shape, 64, /*topk=*/1 << 20, at::kFloat);
    ASSERT_EQ(codec.k(), codec.tile_numel());
    const at::Tensor delta = at::randn(shape);
    const at::Tensor sent = codec.Decode(codec.Decompress(codec.Select(codec.Encode(delta)), at::kFloat));
    EXPECT_LE((delta - sent).norm().item<float>(), 1e-6 * delta.norm().item<float>());
  }
}

TEST(DemoCodecTest, WireValuesAreWhatIsSubtracted) {
  at::manual_seed(8);
  for (at::ScalarType wire : {at::kBFloat16, at::kHalf}) {
    const DemoCodec codec = MakeCodec({64, 128}, 64, 32, wire);
    const DemoSelection s = codec.Select(codec.Encode(at::randn({64, 128})));
    ASSERT_EQ(s.values.scalar_type(), wire);
    const at::Tensor own = codec.Decompress(s, at::kFloat);
    // The dense coefficients hold exactly the transmitted values, widened.
    const at::Tensor gathered = own.gather(1, s.indices.to(at::kLong));
    EXPECT_TRUE(at::equal(gathered, s.values.to(at::kFloat)));
    EXPECT_TRUE(at::equal(gathered.to(wire), s.values));
    // And a single worker's scatter-mean is the same tensor: what the others decode from us.
    auto mean = codec.DecompressMean({s}, at::kFloat);
    ASSERT_TRUE(mean.ok()) << mean.status();
    EXPECT_TRUE(at::equal(*mean, own));
  }
}

TEST(DemoCodecTest, MeanOfDisjointAndSharedCoefficients) {
  const DemoCodec codec = MakeCodec({16}, /*chunk=*/8, /*topk=*/2);  // 2 tiles of 8, k = 2
  // Tile 0: disjoint sets; tile 1: index 0 chosen by both.
  const DemoSelection a = HandSelection({{0, 1}, {0, 5}}, {{1.f, 2.f}, {1.f, 3.f}});
  const DemoSelection b = HandSelection({{2, 3}, {0, 6}}, {{4.f, 8.f}, {2.f, 5.f}});
  auto mean = codec.DecompressMean({a, b}, at::kDouble);
  ASSERT_TRUE(mean.ok()) << mean.status();
  const at::Tensor expect =
      at::tensor({1., 2., 4., 8., 0., 0., 0., 0., 1.5, 0., 0., 0., 0., 3., 5., 0.}, at::kDouble)
          .reshape({2, 8});
  EXPECT_TRUE(at::equal(*mean, expect)) << *mean;
}

TEST(DemoCodecTest, MeanIsBitIdenticalForAnyThreadCount) {
  ThreadCountGuard guard;
  at::manual_seed(9);
  const DemoCodec codec = MakeCodec({512, 256}, 64, 32, at::kBFloat16);
  std::vector<DemoSelection> workers;
  for (int w = 0; w < 4; ++w) {
    // Different buffers per worker, with overlap in what they pick.
    workers.push_back(codec.Select(codec.Encode(at::randn({512, 256}) + 0.5 * w)));
  }
  at::set_num_threads(1);
  auto one = codec.DecompressMean(workers, at::kFloat);
  at::set_num_threads(2);
  auto two = codec.DecompressMean(workers, at::kFloat);
  at::set_num_threads(4);
  auto four = codec.DecompressMean(workers, at::kFloat);
  ASSERT_TRUE(one.ok() && two.ok() && four.ok());
  EXPECT_TRUE(at::equal(*one, *two));
  EXPECT_TRUE(at::equal(*one, *four));
  // Selection is tile-parallel too.
  const at::Tensor coefs = codec.Encode(at::randn({512, 256}));
  at::set_num_threads(1);
  const DemoSelection s1 = codec.Select(coefs);
  at::set_num_threads(2);
  const DemoSelection s2 = codec.Select(coefs);
  EXPECT_TRUE(at::equal(s1.indices, s2.indices));
  EXPECT_TRUE(at::equal(s1.values, s2.values));
  // Mean semantics on random data, against a plain loop in this file: per coefficient the mean
  // of the workers that chose it.
  const at::Tensor dense = *one;
  for (int64_t t = 0; t < codec.tiles(); t += 7) {
    std::vector<double> sum(codec.tile_numel(), 0.0);
    std::vector<int> count(codec.tile_numel(), 0);
    for (const DemoSelection& s : workers) {
      for (int64_t j = 0; j < codec.k(); ++j) {
        const int i = s.indices[t][j].item<int>();
        sum[i] += s.values[t][j].item<float>();
        count[i] += 1;
      }
    }
    for (int64_t i = 0; i < codec.tile_numel(); ++i) {
      const float expect = count[i] == 0 ? 0.f : static_cast<float>(sum[i] / count[i]);
      ASSERT_EQ(dense[t][i].item<float>(), expect) << "tile " << t << " coef " << i;
    }
  }
}

TEST(DemoCodecTest, WireBytesFormula) {
  // (2048, 2048), fp32 values, chunk 64, k 32: 1024 tiles · 32 · (2 + 4).
  EXPECT_EQ(*DemoWireBytes({2048, 2048}, 64, 32, at::kFloat), 1024 * 32 * 6);
  // (100, 48), bf16: tiles 50 x 48, two of them, k 32: 2 · 32 · 4.
  EXPECT_EQ(*DemoWireBytes({100, 48}, 64, 32, at::kBFloat16), 2 * 32 * 4);
  // (97,), fp16: chunk 1, 97 tiles of one coefficient, k clamps to 1: 97 · 1 · 4.
  EXPECT_EQ(*DemoWireBytes({97}, 64, 32, at::kHalf), 97 * 1 * 4);
  // (50280,), fp32: chunk 60, 838 tiles.
  EXPECT_EQ(*DemoWireBytes({50280}, 64, 32, at::kFloat), 838 * 32 * 6);
  // The codec's count equals what Select actually produces.
  for (at::ScalarType wire : {at::kFloat, at::kBFloat16, at::kHalf}) {
    const DemoCodec codec = MakeCodec({192, 100}, 64, 32, wire);
    const DemoSelection s = codec.Select(codec.Encode(at::randn({192, 100})));
    EXPECT_EQ(codec.WireBytes(), s.indices.nbytes() + s.values.nbytes());
    EXPECT_EQ(codec.WireBytes(), *DemoWireBytes({192, 100}, 64, 32, wire));
  }
}

TEST(DemoCodecTest, RefusesBadOptions) {
  // chunk 200 on (200, 200): tiles 200 x 200 = 40000 coefficients, beyond int16.
  auto big = DemoCodec::Create({200, 200}, DemoCodecOptions{200, 32, at::kFloat});
  ASSERT_EQ(big.status().code(), absl::StatusCode::kInvalidArgument);
  const std::string message(big.status().message());
  EXPECT_NE(message.find("40000"), std::string::npos) << message;
  EXPECT_NE(message.find("32767"), std::string::npos) << message;
  EXPECT_NE(message.find("200 x 200"), std::string::npos) << message;
  EXPECT_EQ(DemoWireBytes({200, 200}, 200, 32, at::kFloat).status().code(),
            absl::StatusCode::kInvalidArgument);
  // 181 x 181 = 32761 is still addressable.
  EXPECT_TRUE(DemoCodec::Create({181, 181}, DemoCodecOptions{181, 32, at::kFloat}).ok());

  EXPECT_EQ(DemoCodec::Create({64}, DemoCodecOptions{0, 32, at::kFloat}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DemoCodec::Create({64}, DemoCodecOptions{-4, 32, at::kFloat}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DemoCodec::Create({64}, DemoCodecOptions{64, 0, at::kFloat}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DemoCodec::Create({64}, DemoCodecOptions{64, -1, at::kFloat}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DemoCodec::Create({64}, DemoCodecOptions{64, 32, at::kInt}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DemoCodec::Create({0, 64}, DemoCodecOptions{}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(DemoCodecTest, RefusesMalformedPeerSelections) {
  const DemoCodec codec = MakeCodec({16}, 8, 2);
  const DemoSelection good = HandSelection({{0, 1}, {2, 3}}, {{1.f, 1.f}, {1.f, 1.f}});
  auto code_of = [&](const DemoSelection& bad) {
    return codec.DecompressMean({good, bad}, at::kFloat).status().code();
  };
  EXPECT_EQ(codec.DecompressMean({}, at::kFloat).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Index outside the tile.
  auto outside = codec.DecompressMean({good, HandSelection({{0, 1}, {2, 8}}, {{1.f, 1.f}, {1.f, 1.f}})},
                                      at::kFloat);
  ASSERT_EQ(outside.status().code(), absl::StatusCode::kInvalidArgument);
  const std::string message(outside.status().message());
  EXPECT_NE(message.find("worker 1, tile 1: index 8"), std::string::npos) << message;
  EXPECT_EQ(code_of(HandSelection({{0, -1}, {2, 3}}, {{1.f, 1.f}, {1.f, 1.f}})),
            absl::StatusCode::kInvalidArgument);
  // The same index twice from one worker.
  EXPECT_EQ(code_of(HandSelection({{4, 4}, {2, 3}}, {{1.f, 1.f}, {1.f, 1.f}})),
            absl::StatusCode::kInvalidArgument);
  // Wrong k, wrong tile count, wrong dtypes.
  EXPECT_EQ(code_of(HandSelection({{0}, {2}}, {{1.f}, {1.f}})), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code_of(HandSelection({{0, 1}}, {{1.f, 1.f}})), absl::StatusCode::kInvalidArgument);
  DemoSelection wrong_values = good;
  wrong_values.values = good.values.to(at::kBFloat16);
  EXPECT_EQ(code_of(wrong_values), absl::StatusCode::kInvalidArgument);
  DemoSelection wrong_indices = good;
  wrong_indices.indices = good.indices.to(at::kLong);
  EXPECT_EQ(code_of(wrong_indices), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code_of(DemoSelection{}), absl::StatusCode::kInvalidArgument);
  // The good one alone still decodes.
  EXPECT_TRUE(codec.DecompressMean({good}, at::kFloat).ok());
}

// Gradients bounded away from zero, so that their sign survives float rounding.
at::Tensor SignedGrad(const std::vector<int64_t>& shape) {
  return at::randn(shape).sign() * (0.5 + at::rand(shape));
}

// With every coefficient sent and one worker, DeMo is signSGD with decoupled decay and
// the buffer is empty afterwards.
TEST(DemoStepTest, ReducesToSignSgdWhenEverythingIsSent) {
  at::manual_seed(10);
  const std::vector<int64_t> shape = {64, 96};
  const DemoCodec codec = MakeCodec(shape, 64, /*topk=*/1 << 20, at::kFloat);
  const double lr = 0.01, decay = 0.999, wd = 0.1;
  const at::Tensor grad = SignedGrad(shape);
  const at::Tensor p0 = at::randn(shape);
  at::Tensor delta = at::zeros(shape);
  at::Tensor p = p0.clone();
  const DemoSelection mine = DemoCompress(codec, lr, decay, grad, &delta);
  EXPECT_LE(delta.norm().item<float>(), 1e-6 * (lr * grad).norm().item<float>());
  ASSERT_TRUE(DemoApply(codec, {mine}, lr, wd, &p).ok());
  const at::Tensor expect = p0 * (1 - lr * wd) - lr * grad.sign();
  EXPECT_TRUE(at::allclose(p, expect, 0, 1e-6));
}

// With every coefficient sent and W = 2: the update is -lr·sign(mean of the workers' lr·grad).
TEST(DemoStepTest, TwoWorkersEverythingSentIsSignOfMean) {
  at::manual_seed(11);
  const std::vector<int64_t> shape = {300};
  const DemoCodec codec = MakeCodec(shape, 64, 1 << 20, at::kFloat);
  const double lr = 0.02;
  const at::Tensor g1 = SignedGrad(shape);
  const at::Tensor g2 = (at::rand(shape) - 0.5) * 0.5;  // |g2| <= 0.25 < |g1|
  at::Tensor d1 = at::zeros(shape), d2 = at::zeros(shape);
  const std::vector<DemoSelection> gathered = {DemoCompress(codec, lr, 0.9, g1, &d1),
                                               DemoCompress(codec, lr, 0.9, g2, &d2)};
  at::Tensor p = at::zeros(shape);
  ASSERT_TRUE(DemoApply(codec, gathered, lr, 0.0, &p).ok());
  EXPECT_TRUE(at::allclose(p, -lr * (g1 + g2).sign(), 0, 1e-7));
}

// Error-feedback conservation and 0-or-lr moves over a few steps with the default compression:
// the buffer keeps what was not sent, every element moves by 0 or lr beyond the decay, and replicas applying the same
// gathered selections stay bit-identical.
TEST(DemoStepTest, StepsMoveByZeroOrLrAndReplicasAgree) {
  at::manual_seed(12);
  const std::vector<int64_t> shape = {128, 192};
  const DemoCodec codec = MakeCodec(shape, 64, 32, at::kBFloat16);
  const double lr = 0.01, decay = 0.999, wd = 0.1;
  const int workers = 3;
  std::vector<at::Tensor> delta(workers, at::Tensor());
  std::vector<at::Tensor> param(workers, at::Tensor());
  const at::Tensor p_init = at::randn(shape);
  for (int w = 0; w < workers; ++w) {
    delta[w] = at::zeros(shape);
    param[w] = p_init.clone();
  }
  for (int step = 0; step < 3; ++step) {
    std::vector<DemoSelection> gathered;
    for (int w = 0; w < workers; ++w) {
      const at::Tensor grad = at::randn(shape);
      const at::Tensor before = delta[w] * decay + lr * grad;
      gathered.push_back(DemoCompress(codec, lr, decay, grad, &delta[w]));
      const at::Tensor sent = codec.Decode(codec.Decompress(gathered.back(), at::kFloat));
      EXPECT_TRUE(at::allclose(delta[w] + sent, before, 1e-5, 1e-7));
    }
    const at::Tensor p_before = param[0].clone();
    for (int w = 0; w < workers; ++w) {
      ASSERT_TRUE(DemoApply(codec, gathered, lr, wd, &param[w]).ok());
    }
    const at::Tensor moved = (param[0] - p_before * (1 - lr * wd)).abs();
    const at::Tensor near_zero = moved < 1e-6;
    const at::Tensor near_lr = (moved - lr).abs() < 1e-6;
    EXPECT_TRUE((near_zero | near_lr).all().item<bool>()) << "step " << step;
    EXPECT_GT(near_lr.sum().item<int64_t>(), moved.numel() / 2);
    for (int w = 1; w < workers; ++w) EXPECT_TRUE(at::equal(param[w], param[0]));
  }
}

TEST(DemoStepTest, ApplyRefusesBadSelectionsWithoutTouchingTheParameter) {
  const DemoCodec codec = MakeCodec({16}, 8, 2);
  at::Tensor p = at::ones({16});
  const absl::Status status =
      DemoApply(codec, {HandSelection({{0, 9}, {2, 3}}, {{1.f, 1.f}, {1.f, 1.f}})}, 0.1, 0.1, &p);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(at::equal(p, at::ones({16})));
}

}  // namespace
}  // namespace shoal::parallel
