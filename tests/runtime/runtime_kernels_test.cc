// Tests for runtime/kernels.h. Every kernel runs on float32 and is compared with an ATen reference
// op (or a closed form) evaluated in double. Tolerances are relative to the largest magnitude of
// the reference: the kernels use a polynomial exp with ~2e-7 relative error and float sums.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "runtime/kernels.h"
#include "tests/aten_test_util.h"

namespace shoal::runtime::kernels {
namespace {

constexpr double kRelTol = 2e-6;

using shoal::testing::ThreadCountGuard;

at::Tensor RandnF(std::vector<int64_t> shape, uint64_t seed, double std = 1.0, double mean = 0.0) {
  at::manual_seed(seed);
  return (at::randn(shape, at::kDouble) * std + mean).to(at::kFloat).contiguous();
}

at::Tensor D(const at::Tensor& t) { return t.to(at::kDouble); }

bool AllFinite(const at::Tensor& t) { return at::isfinite(t).all().item<bool>(); }

// |got - want| <= rel * max(|want|_max, floor), elementwise; reports the worst element.
void ExpectClose(const at::Tensor& got, const at::Tensor& want, const std::string& what,
                 double rel = kRelTol, double floor = 1e-30) {
  ASSERT_EQ(got.sizes(), want.sizes()) << what;
  const at::Tensor g = D(got).reshape({-1});
  const at::Tensor w = D(want).reshape({-1});
  ASSERT_TRUE(AllFinite(g)) << what << ": non-finite values";
  const double scale = std::max(w.abs().max().item<double>(), floor);
  const at::Tensor err = (g - w).abs();
  const int64_t worst = err.argmax().item<int64_t>();
  const double max_err = err[worst].item<double>();
  EXPECT_LE(max_err, rel * scale) << what << ": worst at flat index " << worst << " got "
                                  << g[worst].item<double>() << " want " << w[worst].item<double>()
                                  << " (max |want| " << scale << ")";
}

// ---------------------------------------------------------------------------------------------
// LayerNorm

struct LayerNormCase {
  int64_t n, c;
};

class LayerNormTest : public ::testing::TestWithParam<LayerNormCase> {};

TEST_P(LayerNormTest, ForwardMatchesAtenInDouble) {
  const auto [n, c] = GetParam();
  const at::Tensor x = RandnF({n, c}, 1, 1.5, 0.3);
  const at::Tensor w = RandnF({c}, 2, 0.5, 1.0);
  const at::Tensor b = RandnF({c}, 3, 0.2);
  at::Tensor out = at::empty({n, c}, at::kFloat);
  at::Tensor mean = at::empty({n}, at::kFloat);
  at::Tensor rstd = at::empty({n}, at::kFloat);
  LayerNormForward(x.data_ptr<float>(), w.data_ptr<float>(), b.data_ptr<float>(), n, c, 1e-5f,
                   out.data_ptr<float>(), mean.data_ptr<float>(), rstd.data_ptr<float>());
  const auto ref = at::native_layer_norm(D(x), {c}, D(w), D(b), 1e-5);
  ExpectClose(out, std::get<0>(ref), "out");
  ExpectClose(mean, std::get<1>(ref).reshape({n}), "mean");
  ExpectClose(rstd, std::get<2>(ref).reshape({n}), "rstd");
  // And the public op, for good measure.
  ExpectClose(out, at::layer_norm(D(x), {c}, D(w), D(b), 1e-5), "out vs at::layer_norm");
}

TEST_P(LayerNormTest, BackwardMatchesAtenInDoubleAndAccumulates) {
  const auto [n, c] = GetParam();
  const at::Tensor x = RandnF({n, c}, 11, 1.2, -0.4);
  const at::Tensor w = RandnF({c}, 12, 0.5, 1.0);
  const at::Tensor b = RandnF({c}, 13, 0.2);
  const at::Tensor dout = RandnF({n, c}, 14);
  const auto ref_fwd = at::native_layer_norm(D(x), {c}, D(w), D(b), 1e-5);
  const at::Tensor mean = std::get<1>(ref_fwd).reshape({n}).to(at::kFloat).contiguous();
  const at::Tensor rstd = std::get<2>(ref_fwd).reshape({n}).to(at::kFloat).contiguous();
  // Pre-existing gradients: the kernel adds to them.
  const at::Tensor dx0 = RandnF({n, c}, 15, 0.3);
  const at::Tensor dw0 = RandnF({c}, 16, 0.3);
  const at::Tensor db0 = RandnF({c}, 17, 0.3);
  at::Tensor dx = dx0.clone(), dw = dw0.clone(), db = db0.clone();
  LayerNormBackward(dout.data_ptr<float>(), x.data_ptr<float>(), w.data_ptr<float>(),
                    mean.data_ptr<float>(), rstd.data_ptr<float>(), n, c, dx.data_ptr<float>(),
                    dw.data_ptr<float>(), db.data_ptr<float>());
  const auto ref = at::native_layer_norm_backward(D(dout), D(x), {c}, D(mean).reshape({n, 1}),
                                                  D(rstd).reshape({n, 1}), D(w), D(b),
                                                  {true, true, true});
  ExpectClose(dx, D(dx0) + std::get<0>(ref), "dx");
  ExpectClose(dw, D(dw0) + std::get<1>(ref), "dw");
  ExpectClose(db, D(db0) + std::get<2>(ref), "db");
}

TEST_P(LayerNormTest, BackwardMatchesClosedFormInDouble) {
  // Second, independent reference: xhat = (x - mean) * rstd, g = dout * w,
  // dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), dw = sum_rows dout * xhat, db = sum dout.
  const auto [n, c] = GetParam();
  const at::Tensor x = RandnF({n, c}, 21, 0.8, 0.1);
  const at::Tensor w = RandnF({c}, 22, 0.5, 1.0);
  const at::Tensor dout = RandnF({n, c}, 23);
  const at::Tensor xd = D(x);
  const at::Tensor mean_d = xd.mean(1, true);
  const at::Tensor rstd_d = at::rsqrt((xd - mean_d).pow(2).mean(1, true) + 1e-5);
  const at::Tensor mean = mean_d.reshape({n}).to(at::kFloat).contiguous();
  const at::Tensor rstd = rstd_d.reshape({n}).to(at::kFloat).contiguous();
  at::Tensor dx = at::zeros({n, c}, at::kFloat), dw = at::zeros({c}, at::kFloat),
             db = at::zeros({c}, at::kFloat);
  LayerNormBackward(dout.data_ptr<float>(), x.data_ptr<float>(), w.data_ptr<float>(),
                    mean.data_ptr<float>(), rstd.data_ptr<float>(), n, c, dx.data_ptr<float>(),
                    dw.data_ptr<float>(), db.data_ptr<float>());
  const at::Tensor xhat = (xd - D(mean).reshape({n, 1})) * D(rstd).reshape({n, 1});
  const at::Tensor g = D(dout) * D(w);
  const at::Tensor want_dx =
      D(rstd).reshape({n, 1}) * (g - g.mean(1, true) - xhat * (g * xhat).mean(1, true));
  ExpectClose(dx, want_dx, "dx");
  ExpectClose(dw, (D(dout) * xhat).sum(0), "dw");
  ExpectClose(db, D(dout).sum(0), "db");
}

// Row counts around the 32-row reduction block; channel counts not multiples of vector widths.
INSTANTIATE_TEST_SUITE_P(Shapes, LayerNormTest,
                         ::testing::Values(LayerNormCase{1, 8}, LayerNormCase{5, 3},
                                           LayerNormCase{31, 64}, LayerNormCase{33, 50},
                                           LayerNormCase{67, 37}, LayerNormCase{130, 128}),
                         [](const auto& info) {
                           return "n" + std::to_string(info.param.n) + "_c" +
                                  std::to_string(info.param.c);
                         });

TEST(LayerNormForwardTest, ConstantRowGivesBiasAndFiniteRstd) {
  // Variance 0: out = b exactly up to rounding, rstd = 1/sqrt(eps).
  const int64_t n = 2, c = 16;
  const at::Tensor x = at::full({n, c}, 3.25f);
  const at::Tensor w = RandnF({c}, 31);
  const at::Tensor b = RandnF({c}, 32);
  at::Tensor out = at::empty({n, c}, at::kFloat), mean = at::empty({n}, at::kFloat),
             rstd = at::empty({n}, at::kFloat);
  LayerNormForward(x.data_ptr<float>(), w.data_ptr<float>(), b.data_ptr<float>(), n, c, 1e-5f,
                   out.data_ptr<float>(), mean.data_ptr<float>(), rstd.data_ptr<float>());
  ExpectClose(out, D(b).expand({n, c}), "out");
  ExpectClose(mean, at::full({n}, 3.25, at::kDouble), "mean");
  ExpectClose(rstd, at::full({n}, 1.0 / std::sqrt(1e-5), at::kDouble), "rstd");
}

TEST(LayerNormBackwardTest, BitwiseIdenticalWithOneAndTwoThreads) {
  const int64_t n = 517, c = 96;  // 17 row blocks, last one partial
  const at::Tensor x = RandnF({n, c}, 41);
  const at::Tensor w = RandnF({c}, 42, 0.5, 1.0);
  const at::Tensor b = RandnF({c}, 43);
  const at::Tensor dout = RandnF({n, c}, 44);
  at::Tensor out = at::empty({n, c}, at::kFloat), mean = at::empty({n}, at::kFloat),
             rstd = at::empty({n}, at::kFloat);
  LayerNormForward(x.data_ptr<float>(), w.data_ptr<float>(), b.data_ptr<float>(), n, c, 1e-5f,
                   out.data_ptr<float>(), mean.data_ptr<float>(), rstd.data_ptr<float>());
  auto run = [&](int threads) {
    ThreadCountGuard guard;
    at::set_num_threads(threads);
    at::Tensor dx = at::zeros({n, c}, at::kFloat), dw = at::zeros({c}, at::kFloat),
               db = at::zeros({c}, at::kFloat);
    LayerNormBackward(dout.data_ptr<float>(), x.data_ptr<float>(), w.data_ptr<float>(),
                      mean.data_ptr<float>(), rstd.data_ptr<float>(), n, c, dx.data_ptr<float>(),
                      dw.data_ptr<float>(), db.data_ptr<float>());
    return std::array<at::Tensor, 3>{dx, dw, db};
  };
  const auto one = run(1);
  const auto two = run(2);
  EXPECT_TRUE(at::equal(one[0], two[0])) << "dx";
  EXPECT_TRUE(at::equal(one[1], two[1])) << "dw";
  EXPECT_TRUE(at::equal(one[2], two[2])) << "db";
  const auto again = run(2);
  EXPECT_TRUE(at::equal(two[1], again[1])) << "dw, same thread count";
}

// ---------------------------------------------------------------------------------------------
// GELU (tanh approximation)

at::Tensor GeluRef(const at::Tensor& x) {  // double
  const double k = std::sqrt(2.0 / M_PI);
  return 0.5 * x * (1.0 + at::tanh(k * (x + 0.044715 * x.pow(3))));
}

at::Tensor GeluGradRef(const at::Tensor& x) {  // double, analytic
  const double k = std::sqrt(2.0 / M_PI);
  const at::Tensor th = at::tanh(k * (x + 0.044715 * x.pow(3)));
  return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * k * (1.0 + 3.0 * 0.044715 * x * x);
}

at::Tensor GeluTestInputs() {
  // A dense sweep over [-10, 10] including 0 and the ends, plus random values; odd length.
  at::Tensor sweep = at::linspace(-10.0, 10.0, 2001, at::kDouble).to(at::kFloat);
  at::Tensor extra = at::tensor({0.0f, -0.0f, 1e-6f, -1e-6f, 3.0f, -3.0f, 10.0f, -10.0f});
  return at::cat({sweep, extra, RandnF({1237}, 51, 2.0)}).contiguous();
}

TEST(GeluTest, ForwardMatchesTanhFormulaInDouble) {
  const at::Tensor x = GeluTestInputs();
  at::Tensor out = at::empty_like(x);
  GeluForward(x.data_ptr<float>(), x.numel(), out.data_ptr<float>());
  ExpectClose(out, GeluRef(D(x)), "gelu");
  // ATen's own tanh-approximate GELU as a second reference.
  ExpectClose(out, at::gelu(D(x), "tanh"), "gelu vs at::gelu");
}

TEST(GeluTest, ForwardSpecialPoints) {
  const at::Tensor x = at::tensor({0.0f, 10.0f, -10.0f, 1.0f});
  at::Tensor out = at::empty_like(x);
  GeluForward(x.data_ptr<float>(), x.numel(), out.data_ptr<float>());
  EXPECT_EQ(out[0].item<float>(), 0.0f);
  EXPECT_NEAR(out[1].item<float>(), 10.0, 1e-5);  // tanh saturates: gelu(10) = 10
  EXPECT_NEAR(out[2].item<float>(), 0.0, 1e-6);   // gelu(-10) ~ -1e-37
  EXPECT_NEAR(out[3].item<float>(), GeluRef(at::tensor({1.0}, at::kDouble))[0].item<double>(),
              2e-6);
}

TEST(GeluTest, BackwardMatchesAnalyticDerivativeInDouble) {
  const at::Tensor x = GeluTestInputs();
  const at::Tensor dout = RandnF({x.numel()}, 52);
  at::Tensor dx = at::empty_like(x);
  GeluBackward(x.data_ptr<float>(), dout.data_ptr<float>(), x.numel(), dx.data_ptr<float>());
  ExpectClose(dx, D(dout) * GeluGradRef(D(x)), "dx");
  // ATen's GELU backward (tanh) as a second reference.
  ExpectClose(dx, at::gelu_backward(D(dout), D(x), "tanh"), "dx vs at::gelu_backward");
}

TEST(GeluTest, BackwardMatchesCentralFiniteDifferenceInDouble) {
  const at::Tensor x = GeluTestInputs();
  const at::Tensor ones = at::ones_like(x);
  at::Tensor dx = at::empty_like(x);
  GeluBackward(x.data_ptr<float>(), ones.data_ptr<float>(), x.numel(), dx.data_ptr<float>());
  const double h = 1e-5;
  const at::Tensor xd = D(x);
  const at::Tensor fd = (GeluRef(xd + h) - GeluRef(xd - h)) / (2 * h);
  // FD truncation error is O(h^2 * gelu''') ~ 1e-10; the float kernel dominates.
  ExpectClose(dx, fd, "dx vs finite difference", 4e-6);
}

TEST(GeluTest, BackwardInPlaceOverDout) {
  const at::Tensor x = GeluTestInputs();
  const at::Tensor dout = RandnF({x.numel()}, 53);
  at::Tensor separate = at::empty_like(x);
  GeluBackward(x.data_ptr<float>(), dout.data_ptr<float>(), x.numel(), separate.data_ptr<float>());
  at::Tensor inplace = dout.clone();
  GeluBackward(x.data_ptr<float>(), inplace.data_ptr<float>(), x.numel(), inplace.data_ptr<float>());
  EXPECT_TRUE(at::equal(inplace, separate));
}

TEST(GeluTest, DerivativeAtSpecialPoints) {
  const at::Tensor x = at::tensor({0.0f, 10.0f, -10.0f});
  const at::Tensor ones = at::ones_like(x);
  at::Tensor dx = at::empty_like(x);
  GeluBackward(x.data_ptr<float>(), ones.data_ptr<float>(), x.numel(), dx.data_ptr<float>());
  EXPECT_NEAR(dx[0].item<float>(), 0.5, 1e-6);  // gelu'(0) = 1/2
  EXPECT_NEAR(dx[1].item<float>(), 1.0, 1e-6);
  EXPECT_NEAR(dx[2].item<float>(), 0.0, 1e-6);
  EXPECT_TRUE(AllFinite(dx));
}

// ---------------------------------------------------------------------------------------------
// Causal softmax

// Reference in double: softmax over the causal row of scale * s, zeros above the diagonal.
at::Tensor CausalSoftmaxRef(const at::Tensor& s, int64_t t, double scale) {
  const at::Tensor mask = at::ones({t, t}, at::kBool).triu(1);
  const at::Tensor masked = (D(s) * scale).masked_fill(mask, -std::numeric_limits<double>::infinity());
  return at::softmax(masked, -1);
}

TEST(CausalSoftmaxTest, ForwardMatchesMaskedSoftmaxInDouble) {
  for (int64_t t : {1, 2, 7, 64}) {
    const int64_t rows = 3;
    const double scale = 1.0 / std::sqrt(16.0);
    const at::Tensor s = RandnF({rows, t, t}, 60 + t, 3.0);
    at::Tensor p = s.clone();
    CausalSoftmaxForward(p.data_ptr<float>(), rows, t, static_cast<float>(scale));
    const at::Tensor want = CausalSoftmaxRef(s, t, scale);
    ExpectClose(p, want, "softmax t=" + std::to_string(t));
    EXPECT_TRUE(at::equal(p.triu(1), at::zeros_like(p))) << "nonzero above the diagonal";
    ExpectClose(D(p).sum(-1), at::ones({rows, t}, at::kDouble), "row sums t=" + std::to_string(t));
  }
}

TEST(CausalSoftmaxTest, ForwardWithLargeScoresHasNoNanOrInf) {
  const int64_t rows = 2, t = 33;
  // Scores of +-80 (and scale 1): exponents span 160, beyond float exp's range if not shifted.
  at::Tensor s = at::where(RandnF({rows, t, t}, 70) > 0, at::full({}, 80.0f), at::full({}, -80.0f))
                     .contiguous();
  s[0][5][2] = 79.5f;
  at::Tensor p = s.clone();
  CausalSoftmaxForward(p.data_ptr<float>(), rows, t, 1.0f);
  EXPECT_TRUE(AllFinite(p));
  ExpectClose(p, CausalSoftmaxRef(s, t, 1.0), "softmax of +-80");
  // Garbage above the diagonal is ignored: NaN and inf there change nothing.
  at::Tensor s2 = s.clone();
  s2 = s2.masked_fill(at::ones({t, t}, at::kBool).triu(1), std::numeric_limits<float>::infinity());
  s2[1][0][t - 1] = std::numeric_limits<float>::quiet_NaN();
  CausalSoftmaxForward(s2.data_ptr<float>(), rows, t, 1.0f);
  EXPECT_TRUE(at::equal(s2, p));
}

TEST(CausalSoftmaxTest, BackwardMatchesClosedFormAndAten) {
  for (int64_t t : {1, 5, 40}) {
    const int64_t rows = 3;
    const double scale = 0.35;
    const at::Tensor s = RandnF({rows, t, t}, 80 + t, 2.0);
    at::Tensor p = s.clone();
    CausalSoftmaxForward(p.data_ptr<float>(), rows, t, static_cast<float>(scale));
    // dP with garbage above the diagonal, which must not matter.
    const at::Tensor dp_in = RandnF({rows, t, t}, 90 + t);
    at::Tensor ds = dp_in.clone();
    CausalSoftmaxBackward(p.data_ptr<float>(), ds.data_ptr<float>(), rows, t,
                          static_cast<float>(scale));
    // Closed form in double over the lower triangle: scale * P * (dP - rowsum(dP * P)).
    const at::Tensor lower = at::ones({t, t}, at::kBool).tril();
    const at::Tensor pd = D(p);
    const at::Tensor dpd = D(dp_in).masked_fill(lower.logical_not(), 0.0);
    const at::Tensor want = scale * pd * (dpd - (dpd * pd).sum(-1, true));
    ExpectClose(ds, want.masked_fill(lower.logical_not(), 0.0), "dS t=" + std::to_string(t));
    // ATen's softmax backward on the full masked softmax agrees.
    const at::Tensor aten =
        scale * at::_softmax_backward_data(D(dp_in), pd, -1, at::kDouble);
    ExpectClose(ds, aten.masked_fill(lower.logical_not(), 0.0), "dS vs ATen t=" + std::to_string(t));
    EXPECT_TRUE(at::equal(ds.triu(1), at::zeros_like(ds)));
  }
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy

struct CeResult {
  double loss;
  at::Tensor probs;
  at::Tensor grad;
};

CeResult RunCrossEntropy(const at::Tensor& logits, const at::Tensor& targets, float dloss) {
  const int64_t n = logits.size(0), v = logits.size(1);
  CeResult r;
  at::Tensor buf = logits.clone();
  r.loss = CrossEntropyForward(buf.data_ptr<float>(), targets.data_ptr<int64_t>(), n, v);
  r.probs = buf.clone();
  CrossEntropyBackward(buf.data_ptr<float>(), targets.data_ptr<int64_t>(), n, v, dloss);
  r.grad = buf;
  return r;
}

void ExpectCrossEntropyMatchesReference(const at::Tensor& logits, const at::Tensor& targets,
                                        float dloss, const std::string& what) {
  const int64_t n = logits.size(0), v = logits.size(1);
  const CeResult r = RunCrossEntropy(logits, targets, dloss);
  const double want_loss = at::cross_entropy_loss(D(logits), targets).item<double>();
  EXPECT_TRUE(std::isfinite(r.loss)) << what;
  EXPECT_NEAR(r.loss, want_loss, kRelTol * std::max(1.0, std::abs(want_loss))) << what;
  const at::Tensor want_probs = at::softmax(D(logits), -1);
  ExpectClose(r.probs, want_probs, what + " probs");
  const at::Tensor onehot = at::one_hot(targets, v).to(at::kDouble);
  ExpectClose(r.grad, (want_probs - onehot) * (static_cast<double>(dloss) / n), what + " grad");
}

TEST(CrossEntropyTest, MatchesAtenInDouble) {
  const int64_t n = 37, v = 101;
  const at::Tensor logits = RandnF({n, v}, 100, 2.0);
  at::manual_seed(101);
  const at::Tensor targets = at::randint(v, {n}, at::kLong);
  ExpectCrossEntropyMatchesReference(logits, targets, 1.0f, "random");
  ExpectCrossEntropyMatchesReference(logits, targets, 0.25f, "random, dloss 0.25");
}

TEST(CrossEntropyTest, UniformLogitsGiveLogV) {
  const int64_t n = 4, v = 50;
  const at::Tensor logits = at::full({n, v}, 7.0f);
  const at::Tensor targets = at::tensor({0, 49, 13, 13}, at::kLong);
  const CeResult r = RunCrossEntropy(logits, targets, 1.0f);
  EXPECT_NEAR(r.loss, std::log(50.0), 2e-6 * std::log(50.0));
  ExpectClose(r.probs, at::full({n, v}, 1.0 / v, at::kDouble), "probs");
}

TEST(CrossEntropyTest, LargeLogitsTargetAtTheMaximum) {
  // Logits of +-80: e^80 overflows nothing only if shifted by the max first.
  const int64_t n = 6, v = 40;
  at::Tensor logits =
      at::where(RandnF({n, v}, 110) > 0, at::full({}, 80.0f), at::full({}, -80.0f)).contiguous();
  std::vector<int64_t> t(n);
  for (int64_t r = 0; r < n; ++r) {
    t[r] = (r * 7) % v;
    logits[r][t[r]] = 80.0f;
  }
  const at::Tensor targets = at::tensor(t, at::kLong);
  ExpectCrossEntropyMatchesReference(logits, targets, 1.0f, "+-80, target at max");
}

TEST(CrossEntropyTest, LargeLogitsTargetFarBelowTheMaximum) {
  // The target's logit is 160 below the maximum: loss = 160 + log(1 + ...), finite and exact in
  // double even though p[target] underflows in float.
  const int64_t n = 3, v = 8;
  at::Tensor logits = at::zeros({n, v}, at::kFloat);
  logits[0][0] = 80.0f;
  logits[0][1] = -80.0f;  // target of row 0
  logits[1].fill_(-80.0f);
  logits[1][7] = 80.0f;   // target of row 1 is 0, at -80
  logits[2][3] = 80.0f;
  logits[2][4] = -80.0f;  // target of row 2
  const at::Tensor targets = at::tensor({1, 0, 4}, at::kLong);
  ExpectCrossEntropyMatchesReference(logits, targets, 1.0f, "+-80, target at -80");
}

TEST(CrossEntropyTest, PerRowLossesAreAveraged) {
  // Two rows with closed-form losses: [0, 0] target 0 -> log 2; [ln 3, 0, 0] target 0 -> log(5/3).
  const at::Tensor logits = at::tensor({0.0f, 0.0f, -1e30f, static_cast<float>(std::log(3.0)), 0.0f,
                                        0.0f}).reshape({2, 3});
  // Row 0 has a -1e30 logit: exp underflows to exactly 0, so it is a 2-class row.
  const at::Tensor targets = at::tensor({0, 0}, at::kLong);
  const CeResult r = RunCrossEntropy(logits, targets, 1.0f);
  const double want = 0.5 * (std::log(2.0) + std::log(5.0 / 3.0));
  EXPECT_NEAR(r.loss, want, 2e-6 * want);
}

// ---------------------------------------------------------------------------------------------
// Embedding

TEST(EmbeddingTest, ForwardMatchesIndexSelectInDouble) {
  const int64_t b = 3, t = 5, c = 37, vocab = 11;
  const at::Tensor wte = RandnF({vocab, c}, 120);
  const at::Tensor wpe = RandnF({t, c}, 121);
  at::manual_seed(122);
  const at::Tensor tokens = at::randint(vocab, {b, t}, at::kLong);
  at::Tensor out = at::empty({b * t, c}, at::kFloat);
  EmbeddingForward(tokens.data_ptr<int64_t>(), wte.data_ptr<float>(), wpe.data_ptr<float>(), b, t,
                   c, out.data_ptr<float>());
  const at::Tensor want =
      (D(wte).index_select(0, tokens.reshape({-1})).reshape({b, t, c}) + D(wpe).unsqueeze(0))
          .reshape({b * t, c});
  ExpectClose(out, want, "embedding");
}

TEST(EmbeddingTest, BackwardMatchesIndexAddInDoubleAndAccumulates) {
  const int64_t b = 4, t = 6, c = 45, vocab = 9;
  at::manual_seed(130);
  at::Tensor tokens = at::randint(vocab, {b, t}, at::kLong);
  tokens[0][0] = 2;  // make sure some tokens repeat
  tokens[1][3] = 2;
  tokens[3][5] = 2;
  const at::Tensor dout = RandnF({b * t, c}, 131);
  const at::Tensor dwte0 = RandnF({vocab, c}, 132, 0.1);
  const at::Tensor dwpe0 = RandnF({t, c}, 133, 0.1);
  at::Tensor dwte = dwte0.clone(), dwpe = dwpe0.clone();
  EmbeddingBackward(tokens.data_ptr<int64_t>(), dout.data_ptr<float>(), b, t, c,
                    dwte.data_ptr<float>(), dwpe.data_ptr<float>());
  const at::Tensor want_wte = D(dwte0).index_add(0, tokens.reshape({-1}), D(dout));
  const at::Tensor want_wpe = D(dwpe0) + D(dout).reshape({b, t, c}).sum(0);
  ExpectClose(dwte, want_wte, "dwte");
  ExpectClose(dwpe, want_wpe, "dwpe");
}

TEST(EmbeddingTest, BackwardLeavesUnusedRowsUntouched) {
  const int64_t b = 1, t = 3, c = 20, vocab = 5;
  const at::Tensor tokens = at::tensor({4, 1, 4}, at::kLong).reshape({b, t});
  const at::Tensor dout = RandnF({b * t, c}, 140);
  const at::Tensor dwte0 = RandnF({vocab, c}, 141);
  at::Tensor dwte = dwte0.clone(), dwpe = at::zeros({t, c}, at::kFloat);
  EmbeddingBackward(tokens.data_ptr<int64_t>(), dout.data_ptr<float>(), b, t, c,
                    dwte.data_ptr<float>(), dwpe.data_ptr<float>());
  for (int64_t row : {0, 2, 3}) EXPECT_TRUE(at::equal(dwte[row], dwte0[row])) << row;
}

TEST(EmbeddingTest, BackwardBitwiseIdenticalWithOneAndTwoThreads) {
  const int64_t b = 8, t = 64, c = 200, vocab = 13;  // few tokens: many repeated accumulations
  at::manual_seed(150);
  const at::Tensor tokens = at::randint(vocab, {b, t}, at::kLong);
  const at::Tensor dout = RandnF({b * t, c}, 151);
  auto run = [&](int threads) {
    ThreadCountGuard guard;
    at::set_num_threads(threads);
    at::Tensor dwte = at::zeros({vocab, c}, at::kFloat), dwpe = at::zeros({t, c}, at::kFloat);
    EmbeddingBackward(tokens.data_ptr<int64_t>(), dout.data_ptr<float>(), b, t, c,
                      dwte.data_ptr<float>(), dwpe.data_ptr<float>());
    return std::make_pair(dwte, dwpe);
  };
  const auto one = run(1);
  const auto two = run(2);
  EXPECT_TRUE(at::equal(one.first, two.first)) << "dwte";
  EXPECT_TRUE(at::equal(one.second, two.second)) << "dwpe";
}

}  // namespace
}  // namespace shoal::runtime::kernels
