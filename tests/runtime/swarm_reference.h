// The model, data and single-process reference the swarm tests compare against: a tiny GPT,
// micro-batches that depend only on (step, id), and the full model stepping with grad_accum = M
// (Gpt::ForwardBackward, which the golden test pins to PyTorch, and its own AdamW).
#ifndef SHOAL_TESTS_RUNTIME_SWARM_REFERENCE_H_
#define SHOAL_TESTS_RUNTIME_SWARM_REFERENCE_H_

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "parallel/adamw.h"
#include "runtime/config.h"
#include "runtime/gpt.h"
#include "tests/runtime/tensor_compare.h"

namespace shoal::runtime::swarm_test {

constexpr uint64_t kSeed = 4321;
constexpr int kStages = 3;
constexpr int kMicro = 8;  // M
constexpr int64_t kB = 2, kT = 8;
constexpr double kLr = 3e-3;
constexpr double kClip = 0.5;

inline ModelConfig Model() {
  return ModelConfig{/*n_layer=*/4, /*n_head=*/2, /*n_embd=*/16, /*block_size=*/8,
                     /*vocab_size=*/32};
}

inline parallel::AdamWOptions Adam() { return parallel::AdamWOptions{}; }

struct Batch {
  at::Tensor tokens, targets;
};

inline Batch MicroBatchOf(int64_t step, int id) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(1000 * step + id + 7);
  return {at::randint(Model().vocab_size, {kB, kT}, gen, at::kLong),
          at::randint(Model().vocab_size, {kB, kT}, gen, at::kLong)};
}

// The single process: the full model, grad_accum = M, clipping by the global norm, AdamW.
struct Reference {
  std::unique_ptr<Gpt> model;
  std::unique_ptr<parallel::AdamW> adamw;

  Reference() {
    auto m = Gpt::CreateStage(Model(), kSeed, 0, Model().n_layer + 2);
    EXPECT_TRUE(m.ok()) << m.status();
    model = std::move(*m);
    adamw = std::make_unique<parallel::AdamW>(
        std::vector<parallel::ParamGroup>{
            {&model->params(Gpt::kDecay), &model->grads(Gpt::kDecay), true},
            {&model->params(Gpt::kNoDecay), &model->grads(Gpt::kNoDecay), false}},
        Adam());
  }

  // The step's micro-batches, accumulated; returns the mean loss.
  double Accumulate(int64_t step) {
    model->ZeroGrad();
    double loss = 0;
    for (int id = 0; id < kMicro; ++id) {
      const Batch b = MicroBatchOf(step, id);
      loss += model->ForwardBackward(b.tokens, b.targets, 1.0f / kMicro);
    }
    return loss / kMicro;
  }
  void Update() {
    const double norm = parallel::GlobalL2Norm(
        {model->grads(Gpt::kDecay).flat(), model->grads(Gpt::kNoDecay).flat()});
    adamw->Step(kLr, parallel::ClipScale(norm, kClip));
  }
};

inline double MaxAbsDiff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

}  // namespace shoal::runtime::swarm_test

#endif  // SHOAL_TESTS_RUNTIME_SWARM_REFERENCE_H_
