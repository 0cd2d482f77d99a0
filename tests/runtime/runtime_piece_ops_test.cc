// The two sets of the GPT's non-GEMM operations (runtime/piece_ops.h): the device-generic ATen
// calls against the fused CPU kernels, op by op on random inputs (each checked against the
// other: ATen's LayerNorm, GELU, softmax and index ops are an implementation independent of
// runtime/kernels.cc), and ten optimizer steps of training with each (losses and weights within
// 1e-5). The PyTorch reference pins both in runtime_gpt_golden_test, the tensor-parallel forms in
// runtime_gpt_tp_test.
#include "runtime/piece_ops.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "runtime/config.h"
#include "runtime/gpt.h"
#include "runtime/step_engine.h"
#include "tests/runtime/tensor_compare.h"

namespace shoal::runtime {
namespace {

const PieceOps& Fused() { return OpsFor(Kernels::kFused); }
const PieceOps& Aten() { return OpsFor(Kernels::kAten); }

at::Generator Gen(uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); }

// Runs `op` on clones of `inputs` once per set and compares every tensor afterwards (the ops
// work in place and accumulate, so the outputs are among the inputs).
void ExpectSame(const std::string& what, const std::vector<at::Tensor>& inputs,
                const std::function<void(const PieceOps&, std::vector<at::Tensor>&)>& op,
                double tol = 2e-6) {
  std::vector<at::Tensor> fused, aten;
  for (const at::Tensor& t : inputs) {
    fused.push_back(t.clone());
    aten.push_back(t.clone());
  }
  op(Fused(), fused);
  op(Aten(), aten);
  for (size_t i = 0; i < inputs.size(); ++i) {
    EXPECT_LT(RelMaxError(aten[i], fused[i]), tol) << what << ", tensor " << i;
  }
}

TEST(PieceOpsTest, KernelsParseAndABadNameIsRefusedNamingIt) {
  EXPECT_EQ(*ParseKernels("fused"), Kernels::kFused);
  EXPECT_EQ(*ParseKernels("aten"), Kernels::kAten);
  const absl::StatusOr<Kernels> bad = ParseKernels("cuda");
  ASSERT_FALSE(bad.ok());
  EXPECT_TRUE(absl::IsInvalidArgument(bad.status()));
  EXPECT_NE(bad.status().message().find("'cuda'"), std::string::npos) << bad.status();
  EXPECT_STREQ(KernelsName(Kernels::kAten), "aten");
}

TEST(PieceOpsTest, LayerNormAndGelu) {
  at::Generator g = Gen(1);
  const int64_t n = 37, c = 24;
  const at::Tensor x = at::randn({n, c}, g) * 3 + 1, w = at::randn({c}, g), b = at::randn({c}, g);
  ExpectSame("LayerNorm", {x, w, b, at::empty({n, c}), at::empty({n}), at::empty({n})},
             [](const PieceOps& ops, std::vector<at::Tensor>& t) {
               ops.LayerNormForward(t[0], t[1], t[2], 1e-5f, t[3], t[4], t[5]);
             });
  // Backward accumulates into dx, dw and db: start them non-zero.
  at::Tensor out = at::empty({n, c}), mean = at::empty({n}), rstd = at::empty({n});
  Fused().LayerNormForward(x, w, b, 1e-5f, out, mean, rstd);
  ExpectSame("LayerNorm backward",
             {at::randn({n, c}, g), x, w, mean, rstd, at::randn({n, c}, g), at::randn({c}, g),
              at::randn({c}, g)},
             [](const PieceOps& ops, std::vector<at::Tensor>& t) {
               ops.LayerNormBackward(t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7]);
             });
  const at::Tensor h = at::randn({n, 4 * c}, g) * 4;
  ExpectSame("GELU", {h, at::empty({n, 4 * c})},
             [](const PieceOps& ops, std::vector<at::Tensor>& t) { ops.GeluForward(t[0], t[1]); });
  ExpectSame("GELU backward", {h, at::randn({n, 4 * c}, g)},
             [](const PieceOps& ops, std::vector<at::Tensor>& t) { ops.GeluBackward(t[0], t[1]); });
}

TEST(PieceOpsTest, CausalSoftmax) {
  at::Generator g = Gen(2);
  const int64_t r = 5, t = 9;
  const float scale = 0.35f;
  const at::Tensor scores = at::randn({r, t, t}, g) * 5;
  ExpectSame("causal softmax", {scores}, [&](const PieceOps& ops, std::vector<at::Tensor>& v) {
    ops.CausalSoftmaxForward(v[0], scale);
  });
  at::Tensor p = scores.clone();
  Fused().CausalSoftmaxForward(p, scale);
  // Zeros above the diagonal, rows summing to 1: the contract itself, on the ATen set.
  at::Tensor q = scores.clone();
  Aten().CausalSoftmaxForward(q, scale);
  EXPECT_EQ(q.triu(1).abs().max().item<float>(), 0.0f);
  EXPECT_LT((q.sum(-1) - 1).abs().max().item<float>(), 1e-6f);
  ExpectSame("causal softmax backward", {p, at::randn({r, t, t}, g)},
             [&](const PieceOps& ops, std::vector<at::Tensor>& v) {
               ops.CausalSoftmaxBackward(v[0], v[1], scale);
             });
}

TEST(PieceOpsTest, CrossEntropyAndEmbedding) {
  at::Generator g = Gen(3);
  const int64_t bsz = 3, t = 7, n = bsz * t, v = 50, c = 16;
  const at::Tensor logits = at::randn({n, v}, g) * 4;
  const at::Tensor targets = at::randint(v, {n}, g, at::kLong);
  double loss_fused = 0, loss_aten = 0;
  ExpectSame("cross-entropy", {logits}, [&](const PieceOps& ops, std::vector<at::Tensor>& x) {
    (&ops == &Fused() ? loss_fused : loss_aten) = ops.CrossEntropyForward(x[0], targets);
  });
  EXPECT_NEAR(loss_aten, loss_fused, 1e-6 * loss_fused);
  // The closed form, independently: mean of logsumexp - the target's logit.
  const double want = (at::logsumexp(logits.to(at::kDouble), {1}) -
                       logits.to(at::kDouble).gather(1, targets.view({-1, 1})).view({-1}))
                          .mean()
                          .item<double>();
  EXPECT_NEAR(loss_aten, want, 1e-6 * want);
  at::Tensor probs = logits.clone();
  Fused().CrossEntropyForward(probs, targets);
  ExpectSame("cross-entropy backward", {probs}, [&](const PieceOps& ops,
                                                    std::vector<at::Tensor>& x) {
    ops.CrossEntropyBackward(x[0], targets, 0.75f);
  });

  const at::Tensor tokens = at::randint(v, {bsz, t}, g, at::kLong);
  const at::Tensor wte = at::randn({v, c}, g), wpe = at::randn({t + 2, c}, g);
  ExpectSame("embedding", {at::empty({n, c})}, [&](const PieceOps& ops,
                                                   std::vector<at::Tensor>& x) {
    ops.EmbeddingForward(tokens, wte, wpe, x[0]);
  });
  ExpectSame("embedding backward", {at::randn({v, c}, g), at::randn({t + 2, c}, g)},
             [&](const PieceOps& ops, std::vector<at::Tensor>& x) {
               ops.EmbeddingBackward(tokens, at::ones({n, c}) * 0.5 + at::arange(n * c).view(
                                                                        {n, c}) * 1e-3,
                                     x[0], x[1]);
             });
}

// A rank holding vocabulary rows [v_begin, v_begin + v): some tokens and targets fall outside,
// and a rank may hold no rows at all.
TEST(PieceOpsTest, VocabularyParallelForms) {
  at::Generator g = Gen(4);
  const int64_t bsz = 2, t = 8, n = bsz * t, vocab = 40, c = 12;
  const at::Tensor tokens = at::randint(vocab, {bsz, t}, g, at::kLong);
  const at::Tensor targets = at::randint(vocab, {n}, g, at::kLong);
  for (const auto& [v_begin, v] : std::vector<std::pair<int64_t, int64_t>>{{13, 14}, {0, 40},
                                                                            {20, 0}}) {
    SCOPED_TRACE(testing::Message() << "rows [" << v_begin << ", " << v_begin + v << ")");
    const at::Tensor shard = at::randn({v, c}, g), wpe = at::randn({t, c}, g);
    ExpectSame("embedding shard", {at::randn({n, c}, g)},
               [&](const PieceOps& ops, std::vector<at::Tensor>& x) {
                 ops.EmbeddingShardForward(tokens, shard, v_begin, x[0]);
                 ops.AddPositionEmbedding(wpe, bsz, t, x[0]);
               });
    const at::Tensor dout = at::randn({n, c}, g);
    ExpectSame("embedding shard backward", {at::randn({v, c}, g), at::randn({t, c}, g)},
               [&](const PieceOps& ops, std::vector<at::Tensor>& x) {
                 ops.EmbeddingShardBackward(tokens, dout, v_begin, x[0], x[1]);
               });
    const at::Tensor logits = at::randn({n, v}, g) * 3;
    double loss_fused = 0, loss_aten = 0;
    ExpectSame("cross-entropy shard", {logits, at::empty({n}), at::empty({2, n})},
               [&](const PieceOps& ops, std::vector<at::Tensor>& x) {
                 ops.CrossEntropyShardMax(x[0], x[1]);
                 // The group's all-reduces are the identity for a group of one.
                 ops.CrossEntropyShardExp(x[0], targets, v_begin, x[1], x[2]);
                 if (v == 0) x[2][0].fill_(1.0);  // another rank's sums, made up
                 (&ops == &Fused() ? loss_fused : loss_aten) =
                     ops.CrossEntropyShardFinish(x[0], x[2]);
               });
    EXPECT_NEAR(loss_aten, loss_fused, 1e-6 * std::max(1.0, std::abs(loss_fused)));
    ExpectSame("cross-entropy shard backward", {at::rand({n, v}, g)},
               [&](const PieceOps& ops, std::vector<at::Tensor>& x) {
                 ops.CrossEntropyShardBackward(x[0], targets, v_begin, 0.5f);
               });
  }
}

// Ten AdamW steps of two micro-batches with each set, from the same init and batches: the
// losses and every weight within 1e-5.
TEST(PieceOpsTest, TenTrainingStepsWithAtenMatchTheFusedKernels) {
  Config cfg;
  cfg.model = ModelConfig{/*n_layer=*/2, /*n_head=*/2, /*n_embd=*/32, /*block_size=*/16,
                          /*vocab_size=*/64};
  cfg.train.seed = 11;
  cfg.train.steps = 10;
  cfg.train.batch_size = 3;
  cfg.train.grad_accum = 2;
  cfg.optim.lr = 1e-2;
  cfg.optim.warmup_steps = 2;
  cfg.optim.grad_clip = 1.0;
  const int64_t steps = 10, micro = 2, b = 3, t = 16;
  at::Generator g = Gen(5);
  const at::Tensor tokens = at::randint(cfg.model.vocab_size, {steps, micro, b, t}, g, at::kLong);
  // A map the model can learn (next token = 3 x this one + 1), so the weights move for a reason.
  const at::Tensor targets = (tokens * 3 + 1).remainder(cfg.model.vocab_size);

  auto train = [&](const std::string& kernels, std::vector<double>* losses)
      -> std::vector<std::pair<std::string, at::Tensor>> {
    Config c = cfg;
    c.train.kernels = kernels;
    absl::StatusOr<std::unique_ptr<StepEngine>> built = BuildStepEngine(c, SingleProcessContext(c));
    EXPECT_TRUE(built.ok()) << built.status();
    if (!built.ok()) return {};
    for (int64_t s = 0; s < steps; ++s) {
      std::vector<std::pair<at::Tensor, at::Tensor>> mb;
      for (int64_t m = 0; m < micro; ++m) {
        mb.emplace_back(tokens[s][m].contiguous(), targets[s][m].contiguous());
      }
      auto stats = (*built)->Step(s, mb);
      EXPECT_TRUE(stats.ok()) << stats.status();
      if (!stats.ok()) return {};
      losses->push_back(stats->loss);
    }
    std::vector<std::pair<std::string, at::Tensor>> out;
    for (auto& [name, p] : (*built)->model().NamedParameters()) out.emplace_back(name, p.clone());
    return out;
  };
  std::vector<double> fused_losses, aten_losses;
  const auto fused = train("fused", &fused_losses);
  const auto aten = train("aten", &aten_losses);
  ASSERT_EQ(fused_losses.size(), static_cast<size_t>(steps));
  ASSERT_EQ(aten_losses.size(), fused_losses.size());
  for (int64_t s = 0; s < steps; ++s) {
    EXPECT_NEAR(aten_losses[s], fused_losses[s], 1e-5 * fused_losses[s]) << "step " << s;
  }
  EXPECT_GT(fused_losses.front() - fused_losses.back(), 0.05);  // the steps moved the weights
  ASSERT_EQ(aten.size(), fused.size());
  const int64_t c = cfg.model.n_embd;
  for (size_t i = 0; i < fused.size(); ++i) {
    ASSERT_EQ(aten[i].first, fused[i].first);
    at::Tensor a = aten[i].second, f = fused[i].second;
    if (fused[i].first.find("attn.qkv.bias") != std::string::npos) {
      // The key bias's true gradient is exactly zero (softmax ignores a per-row constant): each
      // set sees only its own rounding there, which Adam scales to full-size steps. The query
      // and value parts only.
      a = at::cat({a.narrow(0, 0, c), a.narrow(0, 2 * c, c)});
      f = at::cat({f.narrow(0, 0, c), f.narrow(0, 2 * c, c)});
    }
    EXPECT_LT((a - f).abs().max().item<float>(), 1e-5f) << fused[i].first;
  }
}

}  // namespace
}  // namespace shoal::runtime
