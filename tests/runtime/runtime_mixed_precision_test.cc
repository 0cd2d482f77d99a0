// Mixed precision (`train.dtype = "bf16"`, runtime/piece_ops.h): bfloat16 activations and
// matrix multiplies over float32 master weights, gradients and AdamW state. Checked against the
// float32 path, which runtime_gpt_golden_test pins to the PyTorch reference: op by op within one
// bfloat16 rounding of the output, one forward and backward within bfloat16's error, and 200
// training steps of the tiny model's shape whose loss curve stays within 2 % of fp32's.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "runtime/config.h"
#include "runtime/gpt.h"
#include "runtime/piece_ops.h"
#include "runtime/step_engine.h"
#include "tests/runtime/tensor_compare.h"

namespace shoal::runtime {
namespace {

at::Generator Gen(uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); }

// bfloat16 keeps 8 significant bits: one rounding is within 2^-8 relative.
constexpr double kOneRounding = 1.0 / 256;

TEST(MixedPrecisionTest, DtypeAndKernelsParseAndBadValuesAreRefusedNamingThem) {
  EXPECT_EQ(*ParsePrecision("fp32"), Precision::kFp32);
  EXPECT_EQ(*ParsePrecision("bf16"), Precision::kBf16);
  EXPECT_EQ(ComputeType(Precision::kBf16), at::kBFloat16);
  EXPECT_EQ(ComputeType(Precision::kFp32), at::kFloat);
  const absl::StatusOr<Precision> bad = ParsePrecision("fp16");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("train.dtype = 'fp16'"), std::string::npos)
      << bad.status();
  EXPECT_EQ(*ParseKernels("auto", Precision::kFp32), Kernels::kFused);
  EXPECT_EQ(*ParseKernels("auto", Precision::kBf16), Kernels::kAten);
  EXPECT_EQ(*ParseKernels("aten", Precision::kBf16), Kernels::kAten);
  const absl::StatusOr<Kernels> fused = ParseKernels("fused", Precision::kBf16);
  ASSERT_FALSE(fused.ok());
  EXPECT_NE(fused.status().message().find("'fused' with train.dtype = 'bf16'"), std::string::npos)
      << fused.status();
  const absl::StatusOr<Compute> compute = ParseCompute("auto", "bf16");
  ASSERT_TRUE(compute.ok()) << compute.status();
  EXPECT_EQ(compute->kernels, Kernels::kAten);
  EXPECT_EQ(compute->precision, Precision::kBf16);
  EXPECT_NE(ParseCompute("auto", "fp8").status().message().find("train.dtype = 'fp8'"),
            std::string::npos);
  EXPECT_NE(ParseCompute("cuda", "fp32").status().message().find("train.kernels = 'cuda'"),
            std::string::npos);
}

// Each aten op on bfloat16 activations against the same op on their float32 values: the
// bfloat16 results may differ by the rounding of what is written (and of a bfloat16 input the
// op read back); float32 outputs (LayerNorm's statistics, parameter gradients, the loss) by
// float32 rounding only.
TEST(MixedPrecisionTest, EachOperationOnBf16ActivationsMatchesFloat32OnTheSameValues) {
  const PieceOps& ops = OpsFor(Kernels::kAten);
  at::Generator g = Gen(3);
  const int64_t n = 48, c = 32, r = 6, t = 8, v = 40;
  // Activations representable in bfloat16, so both paths start from the same values.
  auto act = [&](at::IntArrayRef shape) {
    return at::randn(shape, g, at::kFloat).to(at::kBFloat16).to(at::kFloat);
  };
  const at::Tensor x = act({n, c}), w = at::randn({c}, g) + 1, b = at::randn({c}, g);
  {
    at::Tensor out16 = at::empty({n, c}, at::kBFloat16), out32 = at::empty({n, c});
    at::Tensor m16 = at::empty({n}), r16 = at::empty({n}), m32 = at::empty({n}),
               r32 = at::empty({n});
    ops.LayerNormForward(x.to(at::kBFloat16), w, b, 1e-5f, out16, m16, r16);
    ops.LayerNormForward(x, w, b, 1e-5f, out32, m32, r32);
    EXPECT_EQ(m16.scalar_type(), at::kFloat);
    EXPECT_LT(RelMaxError(out16.to(at::kFloat), out32), 2 * kOneRounding);
    EXPECT_LT(RelMaxError(m16, m32), 1e-6);
    EXPECT_LT(RelMaxError(r16, r32), 1e-6);
    const at::Tensor dout = act({n, c});
    at::Tensor dx16 = at::zeros({n, c}, at::kBFloat16), dx32 = at::zeros({n, c});
    at::Tensor dw16 = at::zeros({c}), db16 = at::zeros({c}), dw32 = at::zeros({c}),
               db32 = at::zeros({c});
    ops.LayerNormBackward(dout.to(at::kBFloat16), x.to(at::kBFloat16), w, m32, r32, dx16, dw16,
                          db16);
    ops.LayerNormBackward(dout, x, w, m32, r32, dx32, dw32, db32);
    EXPECT_LT(RelMaxError(dx16.to(at::kFloat), dx32), 2 * kOneRounding);
    EXPECT_LT(RelMaxError(dw16, dw32), 1e-5);  // float32 gradients from the same values
    EXPECT_LT(RelMaxError(db16, db32), 1e-5);
  }
  {
    at::Tensor g16 = at::empty({n, c}, at::kBFloat16), g32 = at::empty({n, c});
    ops.GeluForward(x.to(at::kBFloat16), g16);
    ops.GeluForward(x, g32);
    EXPECT_LT(RelMaxError(g16.to(at::kFloat), g32), 2 * kOneRounding);
    const at::Tensor dout = act({n, c});
    at::Tensor d16 = dout.to(at::kBFloat16), d32 = dout.clone();
    ops.GeluBackward(x.to(at::kBFloat16), d16);
    ops.GeluBackward(x, d32);
    EXPECT_LT(RelMaxError(d16.to(at::kFloat), d32), 2 * kOneRounding);
  }
  {
    const at::Tensor s = act({r, t, t});
    at::Tensor p16 = s.to(at::kBFloat16), p32 = s.clone();
    ops.CausalSoftmaxForward(p16, 0.5f);
    ops.CausalSoftmaxForward(p32, 0.5f);
    EXPECT_LT(RelMaxError(p16.to(at::kFloat), p32), 2 * kOneRounding);
    EXPECT_EQ(p16.to(at::kFloat).triu(1).abs().max().item<float>(), 0.0f);  // causal
    const at::Tensor dp = act({r, t, t});
    at::Tensor d16 = dp.to(at::kBFloat16), d32 = dp.clone();
    ops.CausalSoftmaxBackward(p32.to(at::kBFloat16), d16, 0.5f);
    ops.CausalSoftmaxBackward(p32.to(at::kBFloat16).to(at::kFloat), d32, 0.5f);
    EXPECT_LT(RelMaxError(d16.to(at::kFloat), d32), 2 * kOneRounding);
  }
  {
    const at::Tensor logits = act({n, v});
    const at::Tensor targets = at::randint(v, {n}, g, at::kLong);
    at::Tensor l16 = logits.to(at::kBFloat16), l32 = logits.clone();
    const double loss16 = ops.CrossEntropyForward(l16, targets);
    const double loss32 = ops.CrossEntropyForward(l32, targets);
    EXPECT_NEAR(loss16, loss32, 1e-6 * loss32);  // computed in float32 from the same values
    EXPECT_LT(RelMaxError(l16.to(at::kFloat), l32), 2 * kOneRounding);
    ops.CrossEntropyBackward(l16, targets, 2.0f);
    ops.CrossEntropyBackward(l32, targets, 2.0f);
    EXPECT_LT(RelMaxError(l16.to(at::kFloat), l32), 4 * kOneRounding);
  }
  {
    const int64_t bsz = 6, seq = 8;
    const at::Tensor tokens = at::randint(v, {bsz, seq}, g, at::kLong);
    const at::Tensor wte = at::randn({v, c}, g), wpe = at::randn({seq, c}, g);
    at::Tensor e16 = at::empty({bsz * seq, c}, at::kBFloat16), e32 = at::empty({bsz * seq, c});
    ops.EmbeddingForward(tokens, wte, wpe, e16);
    ops.EmbeddingForward(tokens, wte, wpe, e32);
    EXPECT_LT(RelMaxError(e16.to(at::kFloat), e32), kOneRounding);  // one rounding of the sum
    const at::Tensor dout = act({bsz * seq, c});
    at::Tensor dwte16 = at::zeros({v, c}), dwpe16 = at::zeros({seq, c}),
               dwte32 = at::zeros({v, c}), dwpe32 = at::zeros({seq, c});
    ops.EmbeddingBackward(tokens, dout.to(at::kBFloat16), dwte16, dwpe16);
    ops.EmbeddingBackward(tokens, dout, dwte32, dwpe32);
    EXPECT_LT(RelMaxError(dwte16, dwte32), 1e-6);
    EXPECT_LT(RelMaxError(dwpe16, dwpe32), 1e-6);
  }
}

// One forward and backward of the same model and batch at fp32 and at bf16: the loss within
// 1 %, the logits and every gradient within bfloat16's accumulated error (a few roundings
// through four layers), and all of them float32.
TEST(MixedPrecisionTest, OneForwardAndBackwardAtBf16IsCloseToFp32) {
  const ModelConfig cfg{/*n_layer=*/4, /*n_head=*/4, /*n_embd=*/64, /*block_size=*/32,
                        /*vocab_size=*/96};
  at::Generator g = Gen(9);
  const at::Tensor tokens = at::randint(cfg.vocab_size, {4, 32}, g, at::kLong);
  const at::Tensor targets = (tokens * 5 + 3).remainder(cfg.vocab_size);
  Gpt fp32(cfg, 21), bf16(cfg, 21);
  fp32.SetKernels(Kernels::kAten);
  bf16.SetKernels(Kernels::kAten);
  bf16.SetPrecision(Precision::kBf16);
  const double l32 = fp32.ForwardBackward(tokens, targets, 1.0f);
  const double l16 = bf16.ForwardBackward(tokens, targets, 1.0f);
  EXPECT_NEAR(l16, l32, 0.01 * l32);
  const auto g32 = fp32.NamedGradients(), g16 = bf16.NamedGradients();
  ASSERT_EQ(g32.size(), g16.size());
  for (size_t i = 0; i < g32.size(); ++i) {
    EXPECT_EQ(g16[i].second.scalar_type(), at::kFloat) << g16[i].first;
    if (g32[i].first.find("attn.qkv.bias") != std::string::npos) continue;  // see below
    // Relative to the gradient's norm: single elements near zero carry no information.
    const double err = (g16[i].second - g32[i].second).norm().item<double>() /
                       g32[i].second.norm().item<double>();
    EXPECT_LT(err, 0.05) << g32[i].first;
  }
  const at::Tensor lg32 = fp32.Logits(tokens), lg16 = bf16.Logits(tokens);
  EXPECT_EQ(lg16.scalar_type(), at::kFloat);
  EXPECT_LT((lg16 - lg32).norm().item<double>() / lg32.norm().item<double>(), 0.02);
}

// A sequence a model can learn: each token is followed by one of four successors of its own
// (drawn once from the seed), chosen at random; the loss floor is ln 4.
at::Tensor MarkovTokens(int64_t count, int64_t vocab, uint64_t seed) {
  at::Generator g = Gen(seed);
  const at::Tensor succ = at::randint(vocab, {vocab, 4}, g, at::kLong);
  const at::Tensor pick = at::randint(4, {count}, g, at::kLong);
  at::Tensor out = at::empty({count}, at::kLong);
  const int64_t* s = succ.data_ptr<int64_t>();
  const int64_t* k = pick.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  o[0] = 0;
  for (int64_t i = 1; i < count; ++i) o[i] = s[o[i - 1] * 4 + k[i]];
  return out;
}

// The check: 200 steps of the tiny config's model (4 layers, 4 heads, width 128, byte
// vocabulary) at bf16 and at fp32 on the same batches; every step's loss within 2 % of fp32's,
// the run learning (the loss falls by more than half), the master weights float32, and the
// activations held for backward about half fp32's bytes (LayerNorm's statistics stay float32).
TEST(MixedPrecisionTest, TwoHundredTinyStepsAtBf16StayWithinTwoPercentOfFp32) {
  Config cfg;
  cfg.model = ModelConfig{/*n_layer=*/4, /*n_head=*/4, /*n_embd=*/128, /*block_size=*/64,
                          /*vocab_size=*/256};
  cfg.train.seed = 1337;
  cfg.train.steps = 200;
  cfg.train.batch_size = 8;
  cfg.optim.lr = 1e-3;
  cfg.optim.warmup_steps = 20;
  const int64_t steps = 200, b = 8, t = 64;
  const at::Tensor stream = MarkovTokens(steps * b * t + 1, cfg.model.vocab_size, 77);
  int64_t activation_bytes[2] = {0, 0};
  auto train = [&](const std::string& dtype) {
    Config c = cfg;
    c.train.dtype = dtype;
    std::vector<double> losses;
    absl::StatusOr<std::unique_ptr<StepEngine>> built = BuildStepEngine(c, SingleProcessContext(c));
    EXPECT_TRUE(built.ok()) << built.status();
    if (!built.ok()) return losses;
    for (int64_t s = 0; s < steps; ++s) {
      const at::Tensor x = stream.narrow(0, s * b * t, b * t).view({b, t}).contiguous();
      const at::Tensor y = stream.narrow(0, s * b * t + 1, b * t).view({b, t}).contiguous();
      absl::StatusOr<StepStats> stats = (*built)->Step(s, {{x, y}});
      EXPECT_TRUE(stats.ok()) << stats.status();
      if (!stats.ok()) return losses;
      losses.push_back(stats->loss);
    }
    for (const auto& [name, p] : (*built)->model().NamedParameters()) {
      EXPECT_EQ(p.scalar_type(), at::kFloat) << name;
    }
    activation_bytes[dtype == "bf16"] = (*built)->model().ActivationBytes();
    return losses;
  };
  const std::vector<double> fp32 = train("fp32"), bf16 = train("bf16");
  ASSERT_EQ(fp32.size(), static_cast<size_t>(steps));
  ASSERT_EQ(bf16.size(), fp32.size());
  double worst = 0;
  for (int64_t s = 0; s < steps; ++s) {
    worst = std::max(worst, std::abs(bf16[s] - fp32[s]) / fp32[s]);
    EXPECT_NEAR(bf16[s], fp32[s], 0.02 * fp32[s]) << "step " << s;
  }
  RecordProperty("worst_relative_loss_gap", std::to_string(worst));
  EXPECT_LT(fp32.back(), 0.5 * fp32.front());  // it learned
  EXPECT_LT(bf16.back(), 0.5 * bf16.front());
  EXPECT_GT(activation_bytes[0], 0);
  EXPECT_LT(activation_bytes[1], 0.55 * activation_bytes[0]);
  EXPECT_GT(activation_bytes[1], 0.45 * activation_bytes[0]);
}

}  // namespace
}  // namespace shoal::runtime
