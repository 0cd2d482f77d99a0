// A tiny model's DeMo worker for the tests of parallel/demo.h: one worker's parameter and gradient
// buffers (a weight-decay group and a plain one) and a Demo over them, laid out from a list of
// parameter specs.
#ifndef SHOAL_TESTS_PARALLEL_DEMO_TEST_WORKERS_H_
#define SHOAL_TESTS_PARALLEL_DEMO_TEST_WORKERS_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "memory/flat_buffer.h"
#include "parallel/demo.h"

namespace shoal::testing {

// One parameter of the tiny model: its name, its shape and whether weight decay applies to it.
struct ParamSpec {
  const char* name;
  std::vector<int64_t> shape;
  bool decay;
};

// The default tiny model: 2-D weights with weight decay, 1-D vectors without. The shapes exercise
// the chunk rule at chunk 64 (64 divides, 96 → 48, 40 < 64 → 40, 50 < 64 → 50, 100 → 50,
// prime 97 → 1).
inline const std::vector<ParamSpec>& DemoTestSpecs() {
  static const std::vector<ParamSpec> specs = {
      {"fc.weight", {128, 64}, true}, {"proj.weight", {96, 40}, true},
      {"head.weight", {50, 64}, true}, {"fc.bias", {64}, false},
      {"ln.gain", {100}, false},       {"head.bias", {97}, false}};
  return specs;
}

// One worker: its own buffers and its own Demo over them. Parameters are numbered in `specs`
// order; each buffer holds its group's parameters in that order. Held by unique_ptr because Demo
// keeps pointers to the buffers.
struct DemoTestWorker {
  std::vector<ParamSpec> specs;
  memory::FlatBuffer decay_params, decay_grads, plain_params, plain_grads;
  std::unique_ptr<parallel::Demo> demo;

  int num_params() const { return static_cast<int>(specs.size()); }
  at::Tensor Param(int i) const {
    return specs[i].decay ? decay_params.View(Index(i)) : plain_params.View(Index(i));
  }
  at::Tensor Grad(int i) const {
    return specs[i].decay ? decay_grads.View(Index(i)) : plain_grads.View(Index(i));
  }
  // The two parameter buffers whole (decay group first), as HashTensors and the replica checks
  // see them.
  std::vector<at::Tensor> Flats() const { return {decay_params.flat(), plain_params.flat()}; }
  std::vector<at::Tensor> CloneFlats() const {
    return {decay_params.flat().clone(), plain_params.flat().clone()};
  }
  std::vector<at::Tensor> CloneParams() const {
    std::vector<at::Tensor> out;
    for (int i = 0; i < num_params(); ++i) out.push_back(Param(i).clone());
    return out;
  }
  void SetParams(const std::vector<at::Tensor>& values) {
    for (int i = 0; i < num_params(); ++i) Param(i).copy_(values[i]);
  }
  void SetGrads(const std::vector<at::Tensor>& grads) {
    for (int i = 0; i < num_params(); ++i) Grad(i).copy_(grads[i]);
  }

 private:
  // The index of parameter i in its own group's buffer.
  int Index(int i) const {
    int n = 0;
    for (int j = 0; j < i; ++j) n += specs[j].decay == specs[i].decay;
    return n;
  }
};

// A worker over `specs` with zero parameters and gradients (the caller fills them) and a Demo with
// `options` over the two groups (weight decay on the first). `name_prefix` renames every
// parameter: same shapes, another layout fingerprint.
inline absl::StatusOr<std::unique_ptr<DemoTestWorker>> MakeDemoTestWorker(
    const std::vector<ParamSpec>& specs, const parallel::DemoOptions& options,
    const std::string& name_prefix = "") {
  auto w = std::make_unique<DemoTestWorker>();
  w->specs = specs;
  for (const ParamSpec& s : specs) {
    (s.decay ? w->decay_params : w->plain_params).Add(name_prefix + s.name, s.shape);
  }
  w->decay_params.Allocate();
  w->plain_params.Allocate();
  w->decay_grads = w->decay_params.MakeLike();
  w->plain_grads = w->plain_params.MakeLike();
  auto demo = parallel::Demo::Create({{&w->decay_params, &w->decay_grads, true},
                                      {&w->plain_params, &w->plain_grads, false}},
                                     options);
  if (!demo.ok()) return demo.status();
  w->demo = *std::move(demo);
  return w;
}

}  // namespace shoal::testing

#endif  // SHOAL_TESTS_PARALLEL_DEMO_TEST_WORKERS_H_
