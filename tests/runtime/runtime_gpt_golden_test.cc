// Golden test: shoal's hand-written GPT forward/backward (with either set of operations,
// train.kernels) and its AdamW step against an independent PyTorch implementation
// (tests/reference/gpt_reference.py, run with Debian's python3-torch) loading the very same
// weights from a safetensors file.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <stdlib.h>

#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "runtime/config.h"
#include "runtime/gpt.h"
#include "runtime/safetensors.h"
#include "runtime/step_engine.h"
#include "tests/runtime/tensor_compare.h"

namespace shoal::runtime {
namespace {

// train.kernels: the fused CPU kernels and the device-generic ATen calls, each against the
// reference.
class GptGoldenTest : public ::testing::TestWithParam<std::string> {};

TEST_P(GptGoldenTest, MatchesPyTorchReference) {
  char tmpl[] = "/tmp/shoal_golden_XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;

  Config cfg;
  cfg.model = ModelConfig{/*n_layer=*/2, /*n_head=*/2, /*n_embd=*/32, /*block_size=*/16,
                          /*vocab_size=*/64};
  cfg.train.seed = 7;
  cfg.train.steps = 5;
  cfg.train.batch_size = 3;
  cfg.train.grad_accum = 2;
  cfg.optim.lr = 1e-2;
  cfg.optim.warmup_steps = 2;
  cfg.optim.min_lr_ratio = 0.1;
  cfg.optim.weight_decay = 0.1;
  cfg.optim.grad_clip = 0.5;  // low enough that clipping engages
  cfg.train.kernels = GetParam();
  const int64_t steps = 5, micro = 2, B = 3, T = 16;

  absl::StatusOr<std::unique_ptr<StepEngine>> built =
      BuildStepEngine(cfg, SingleProcessContext(cfg));
  ASSERT_TRUE(built.ok()) << built.status();
  StepEngine& engine = **built;
  Gpt& model = engine.model();
  ASSERT_TRUE(WriteSafetensors(dir + "/model.safetensors", model.NamedParameters()).ok());

  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(99);
  at::Tensor tokens = at::randint(cfg.model.vocab_size, {steps, micro, B, T}, gen, at::kLong);
  at::Tensor targets = at::randint(cfg.model.vocab_size, {steps, micro, B, T}, gen, at::kLong);
  ASSERT_TRUE(WriteSafetensors(dir + "/inputs.safetensors",
                               {{"tokens", tokens}, {"targets", targets}})
                  .ok());
  nlohmann::json jc = {{"n_layer", cfg.model.n_layer},   {"n_head", cfg.model.n_head},
                       {"n_embd", cfg.model.n_embd},     {"block_size", cfg.model.block_size},
                       {"vocab_size", cfg.model.vocab_size}, {"lr", cfg.optim.lr},
                       {"warmup_steps", cfg.optim.warmup_steps}, {"steps", cfg.train.steps},
                       {"min_lr_ratio", cfg.optim.min_lr_ratio}, {"beta1", cfg.optim.beta1},
                       {"beta2", cfg.optim.beta2},       {"eps", cfg.optim.eps},
                       {"weight_decay", cfg.optim.weight_decay},
                       {"grad_clip", cfg.optim.grad_clip}};
  std::ofstream(dir + "/config.json") << jc.dump();

  // shoal: logits, loss and gradients of micro-batch (0, 0) at the initial weights ...
  at::Tensor x0 = tokens[0][0].contiguous(), y0 = targets[0][0].contiguous();
  at::Tensor logits = model.Logits(x0);
  model.ZeroGrad();
  const double loss0 = model.ForwardBackward(x0, y0, 1.0f);
  std::vector<std::pair<std::string, at::Tensor>> grads;
  for (auto& [name, g] : model.NamedGradients()) grads.emplace_back(name, g.clone());
  // ... then five optimizer steps of two micro-batches each.
  std::vector<double> losses;
  for (int64_t s = 0; s < steps; ++s) {
    std::vector<std::pair<at::Tensor, at::Tensor>> mb;
    for (int64_t m = 0; m < micro; ++m) {
      mb.emplace_back(tokens[s][m].contiguous(), targets[s][m].contiguous());
    }
    auto stats = engine.Step(s, mb);
    ASSERT_TRUE(stats.ok()) << stats.status();
    losses.push_back(stats->loss);
  }

  const std::string cmd = std::string(SHOAL_PYTHON) + " " + SHOAL_SOURCE_DIR +
                          "/tests/reference/gpt_reference.py --model " + dir +
                          "/model.safetensors --inputs " + dir + "/inputs.safetensors --config " +
                          dir + "/config.json --out " + dir + "/ref.safetensors";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  auto ref = ReadSafetensors(dir + "/ref.safetensors");
  ASSERT_TRUE(ref.ok()) << ref.status();
  auto& r = ref->tensors;

  EXPECT_LT(RelMaxError(logits, r.at("logits")), 1e-5);
  const at::Tensor ref_logits = r.at("logits").view({-1, cfg.model.vocab_size});
  const double ref_loss0 =
      at::cross_entropy_loss(ref_logits.to(at::kDouble), y0.view(-1)).item<double>();
  EXPECT_NEAR(loss0, ref_loss0, 1e-5);
  for (auto& [name, g] : grads) {
    ASSERT_TRUE(r.count("grad." + name)) << name;
    EXPECT_LT(RelMaxError(g, r.at("grad." + name)), 1e-4) << "gradient of " << name;
  }
  const at::Tensor ref_losses = r.at("losses");
  ASSERT_EQ(ref_losses.numel(), steps);
  for (int64_t s = 0; s < steps; ++s) {
    EXPECT_NEAR(losses[s], ref_losses[s].item<double>(), 1e-4 * std::abs(losses[s]))
        << "loss of step " << s;
  }
  // The steps moved the weights (the test would be weak otherwise), and to the same place.
  EXPECT_GT(losses.front() - losses.back(), 0.01);
  const int64_t C = cfg.model.n_embd;
  for (auto& [name, p] : model.NamedParameters()) {
    at::Tensor mine = p, theirs = r.at("final." + name);
    if (name.find("attn.qkv.bias") != std::string::npos) {
      // The key bias has an exactly zero true gradient (softmax ignores a per-row constant), so
      // both sides only see rounding noise there, which Adam scales up to full-size steps. Compare
      // the query and value parts only.
      mine = at::cat({p.narrow(0, 0, C), p.narrow(0, 2 * C, C)});
      theirs = at::cat({theirs.narrow(0, 0, C), theirs.narrow(0, 2 * C, C)});
    }
    EXPECT_LT(RelMaxError(mine, theirs), 1e-4) << "weights of " << name;
  }
  std::system(("rm -rf " + dir).c_str());
}

INSTANTIATE_TEST_SUITE_P(Kernels, GptGoldenTest, ::testing::Values("fused", "aten"),
                         [](const ::testing::TestParamInfo<std::string>& p) {
                           return p.param;
                         });

}  // namespace
}  // namespace shoal::runtime
