// Tests for parallel/adamw.h: the update against a closed-form AdamW computed in double in this
// file, the global gradient norm against a plain double sum of squares, the clipping factor, and
// the state dict (names, round trip, and rejection of damaged state without side effects).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "memory/flat_buffer.h"
#include "parallel/adamw.h"
#include "tests/aten_test_util.h"

namespace shoal::parallel {
namespace {

using memory::FlatBuffer;
using StateList = std::vector<std::pair<std::string, at::Tensor>>;

using shoal::testing::ThreadCountGuard;

// Two parameter groups as the model uses them: 2-D weights with decay, vectors without.
// Sizes are not multiples of the 16-element alignment, so padding is present.
struct TwoGroups {
  FlatBuffer decay_params, decay_grads, plain_params, plain_grads;

  TwoGroups() {
    decay_params.Add("h.0.w", {3, 5});
    decay_params.Add("h.1.w", {4, 6});
    decay_params.Allocate();
    plain_params.Add("h.0.b", {7});
    plain_params.Add("ln.g", {5});
    plain_params.Allocate();
    decay_grads = decay_params.MakeLike();
    plain_grads = plain_params.MakeLike();
    // Parameters of the size of a few updates, so that tolerances relative to max |p| are
    // tight relative to the update itself (with p ~ 1 a 1e-5 error in the update would hide).
    FillEntries(decay_params, [](int64_t i) { return 0.02 * std::cos(0.9 * i); });
    FillEntries(plain_params, [](int64_t i) { return 0.02 * std::sin(1.3 * i + 0.2); });
  }

  std::vector<ParamGroup> Groups() {
    return {{&decay_params, &decay_grads, true}, {&plain_params, &plain_grads, false}};
  }

  // Gradients for step `t`: a mix of signs and magnitudes (0.01 .. 50), some exact zeros.
  void SetGrads(int t) {
    auto g = [t](int64_t i) -> double {
      if ((i + t) % 7 == 3) return 0.0;
      const double base = std::sin(0.37 * i + 1.3 * t) + 0.02;
      return (i % 5 == 0) ? 50.0 * base : base;
    };
    FillEntries(decay_grads, g);
    FillEntries(plain_grads, [&](int64_t i) { return -0.5 * g(i + 11); });
  }

  // Writes f(k) into the k-th element of the entries (padding left alone).
  template <typename F>
  static void FillEntries(FlatBuffer& buf, F f) {
    float* data = buf.flat().data_ptr<float>();
    int64_t k = 0;
    for (const auto& e : buf.entries()) {
      for (int64_t j = 0; j < e.numel; ++j) data[e.offset + j] = static_cast<float>(f(k++));
    }
  }
};

// Closed-form AdamW (decoupled decay) in double over one flat buffer.
struct ReferenceGroup {
  std::vector<double> p, m, v;
  explicit ReferenceGroup(const at::Tensor& params) {
    at::Tensor d = params.to(at::kDouble).contiguous();
    p.assign(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
    m.assign(p.size(), 0.0);
    v.assign(p.size(), 0.0);
  }
  void Step(const at::Tensor& grads, int t, double lr, double grad_scale, double wd,
            const AdamWOptions& o) {
    at::Tensor g64 = grads.to(at::kDouble).contiguous();
    const double* g = g64.data_ptr<double>();
    const double bc1 = 1.0 - std::pow(o.beta1, t);
    const double bc2 = 1.0 - std::pow(o.beta2, t);
    for (size_t i = 0; i < p.size(); ++i) {
      const double gi = g[i] * grad_scale;
      p[i] *= 1.0 - lr * wd;
      m[i] = o.beta1 * m[i] + (1.0 - o.beta1) * gi;
      v[i] = o.beta2 * v[i] + (1.0 - o.beta2) * gi * gi;
      p[i] -= lr / bc1 * m[i] / (std::sqrt(v[i]) / std::sqrt(bc2) + o.eps);
    }
  }
};

double MaxAbs(const std::vector<double>& x) {
  double m = 0;
  for (double a : x) m = std::max(m, std::abs(a));
  return m;
}

// |got - want| <= rel * max|want| elementwise.
void ExpectClose(const at::Tensor& got, const std::vector<double>& want, double rel,
                 const std::string& what) {
  at::Tensor g = got.to(at::kDouble).contiguous();
  ASSERT_EQ(static_cast<size_t>(g.numel()), want.size()) << what;
  const double tol = rel * std::max(MaxAbs(want), 1e-30);
  const double* gp = g.data_ptr<double>();
  int bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (std::abs(gp[i] - want[i]) > tol && bad++ < 5) {
      ADD_FAILURE() << what << "[" << i << "]: got " << gp[i] << ", want " << want[i]
                    << " (tol " << tol << ")";
    }
  }
  EXPECT_EQ(bad, 0) << what;
}

// Gathers "exp_avg.*" (or "exp_avg_sq.*") state of one FlatBuffer's entries into its flat layout.
at::Tensor GatherState(const StateList& state, const FlatBuffer& params, const std::string& prefix) {
  std::map<std::string, at::Tensor> by_name(state.begin(), state.end());
  at::Tensor flat = at::zeros({params.numel()}, at::kFloat);
  for (const auto& e : params.entries()) {
    auto it = by_name.find(prefix + e.name);
    EXPECT_NE(it, by_name.end()) << prefix + e.name;
    if (it == by_name.end()) continue;
    flat.narrow(0, e.offset, e.numel).copy_(it->second.reshape({-1}));
  }
  return flat;
}

StateList CloneState(const StateList& state) {
  StateList out;
  for (const auto& [name, t] : state) out.emplace_back(name, t.clone());
  return out;
}

void ExpectStatesEqual(const StateList& a, const StateList& b) {
  std::map<std::string, at::Tensor> ma(a.begin(), a.end()), mb(b.begin(), b.end());
  ASSERT_EQ(ma.size(), mb.size());
  for (const auto& [name, t] : ma) {
    auto it = mb.find(name);
    ASSERT_NE(it, mb.end()) << name;
    EXPECT_TRUE(at::equal(t, it->second)) << name;
  }
}

// ---------------------------------------------------------------------------------------------
// Step

TEST(AdamWStepTest, MatchesClosedFormInDoubleOverThreeSteps) {
  TwoGroups model;
  AdamWOptions opt;
  opt.beta1 = 0.9;
  opt.beta2 = 0.95;
  opt.eps = 1e-8;
  opt.weight_decay = 0.1;
  AdamW adamw(model.Groups(), opt);
  ReferenceGroup ref_decay(model.decay_params.flat());
  ReferenceGroup ref_plain(model.plain_params.flat());

  const double lrs[] = {1e-2, 3e-2, 5e-3};
  const double scales[] = {0.5, 2.0, 1.0};
  for (int t = 1; t <= 3; ++t) {
    model.SetGrads(t);
    ref_decay.Step(model.decay_grads.flat(), t, lrs[t - 1], scales[t - 1], opt.weight_decay, opt);
    ref_plain.Step(model.plain_grads.flat(), t, lrs[t - 1], scales[t - 1], 0.0, opt);
    adamw.Step(lrs[t - 1], scales[t - 1]);
    EXPECT_EQ(adamw.steps(), t);
    const std::string at_step = " after step " + std::to_string(t);
    ExpectClose(model.decay_params.flat(), ref_decay.p, 1e-6, "decay params" + at_step);
    ExpectClose(model.plain_params.flat(), ref_plain.p, 1e-6, "plain params" + at_step);
    const StateList state = adamw.StateDict();
    ExpectClose(GatherState(state, model.decay_params, "exp_avg."), ref_decay.m, 1e-6,
                "decay exp_avg" + at_step);
    ExpectClose(GatherState(state, model.decay_params, "exp_avg_sq."), ref_decay.v, 1e-6,
                "decay exp_avg_sq" + at_step);
    ExpectClose(GatherState(state, model.plain_params, "exp_avg."), ref_plain.m, 1e-6,
                "plain exp_avg" + at_step);
    ExpectClose(GatherState(state, model.plain_params, "exp_avg_sq."), ref_plain.v, 1e-6,
                "plain exp_avg_sq" + at_step);
  }
}

TEST(AdamWStepTest, OtherBetasAndEpsMatchClosedForm) {
  TwoGroups model;
  AdamWOptions opt;
  opt.beta1 = 0.8;
  opt.beta2 = 0.999;
  opt.eps = 1e-6;
  opt.weight_decay = 0.5;
  AdamW adamw(model.Groups(), opt);
  ReferenceGroup ref_decay(model.decay_params.flat());
  ReferenceGroup ref_plain(model.plain_params.flat());
  for (int t = 1; t <= 3; ++t) {
    model.SetGrads(t + 10);
    ref_decay.Step(model.decay_grads.flat(), t, 2e-2, 0.25, opt.weight_decay, opt);
    ref_plain.Step(model.plain_grads.flat(), t, 2e-2, 0.25, 0.0, opt);
    adamw.Step(2e-2, 0.25);
  }
  ExpectClose(model.decay_params.flat(), ref_decay.p, 1e-6, "decay params");
  ExpectClose(model.plain_params.flat(), ref_plain.p, 1e-6, "plain params");
}

TEST(AdamWStepTest, ZeroGradientsOnlyDecayTheDecayGroup) {
  // With g = 0 the moments stay 0 and the Adam term is 0 / (0 + eps) = 0, so the only change is
  // the decoupled decay p *= 1 - lr*wd, and only in the decay group.
  TwoGroups model;
  AdamWOptions opt;
  opt.weight_decay = 0.1;
  AdamW adamw(model.Groups(), opt);
  const at::Tensor decay_before = model.decay_params.flat().to(at::kDouble);
  const at::Tensor plain_before = model.plain_params.flat().clone();
  const double lr = 0.05;
  adamw.Step(lr, 1.0);
  adamw.Step(lr, 1.0);
  const double factor = (1.0 - lr * opt.weight_decay) * (1.0 - lr * opt.weight_decay);
  at::Tensor want = decay_before * factor;
  EXPECT_TRUE(at::allclose(model.decay_params.flat().to(at::kDouble), want, 1e-6, 0.0));
  EXPECT_TRUE(at::equal(model.plain_params.flat(), plain_before));
}

TEST(AdamWStepTest, DecayIndependentOfGradientInTheNoDecayGroup) {
  // weight_decay huge: if it leaked into the no-decay group, that group would collapse.
  TwoGroups model;
  AdamWOptions opt;
  opt.weight_decay = 10.0;
  AdamW adamw(model.Groups(), opt);
  ReferenceGroup ref_plain(model.plain_params.flat());
  ReferenceGroup ref_decay(model.decay_params.flat());
  model.SetGrads(1);
  ref_plain.Step(model.plain_grads.flat(), 1, 0.05, 1.0, 0.0, opt);
  ref_decay.Step(model.decay_grads.flat(), 1, 0.05, 1.0, opt.weight_decay, opt);
  adamw.Step(0.05, 1.0);
  ExpectClose(model.plain_params.flat(), ref_plain.p, 1e-6, "plain params");
  ExpectClose(model.decay_params.flat(), ref_decay.p, 1e-6, "decay params");
}

TEST(AdamWStepTest, GradScaleMultipliesTheGradientFirst) {
  // Scale by a power of two: pre-scaled gradients with scale 1 must give bitwise the same result.
  TwoGroups a, b;
  AdamW opt_a(a.Groups(), AdamWOptions{});
  AdamW opt_b(b.Groups(), AdamWOptions{});
  for (int t = 1; t <= 3; ++t) {
    a.SetGrads(t);
    b.SetGrads(t);
    b.decay_grads.flat().mul_(0.25);
    b.plain_grads.flat().mul_(0.25);
    opt_a.Step(1e-2, 0.25);
    opt_b.Step(1e-2, 1.0);
  }
  EXPECT_TRUE(at::equal(a.decay_params.flat(), b.decay_params.flat()));
  EXPECT_TRUE(at::equal(a.plain_params.flat(), b.plain_params.flat()));
  ExpectStatesEqual(opt_a.StateDict(), opt_b.StateDict());
}

TEST(AdamWStepTest, StepDoesNotTouchGradients) {
  TwoGroups model;
  AdamW adamw(model.Groups(), AdamWOptions{});
  model.SetGrads(1);
  const at::Tensor g1 = model.decay_grads.flat().clone();
  const at::Tensor g2 = model.plain_grads.flat().clone();
  adamw.Step(1e-2, 0.5);
  EXPECT_TRUE(at::equal(model.decay_grads.flat(), g1));
  EXPECT_TRUE(at::equal(model.plain_grads.flat(), g2));
}

TEST(AdamWStepTest, LargeBufferSameResultWithOneAndTwoThreads) {
  // Larger than the parallel grain so the work is really split.
  auto run = [](int threads) {
    ThreadCountGuard guard;
    at::set_num_threads(threads);
    FlatBuffer p, g;
    p.Add("w", {100003});
    p.Allocate();
    g = p.MakeLike();
    p.flat().copy_(at::linspace(-1, 1, p.numel(), at::kFloat));
    g.flat().copy_(at::sin(at::arange(g.numel(), at::kFloat) * 0.01f));
    AdamW opt({{&p, &g, true}}, AdamWOptions{});
    opt.Step(1e-3, 1.0);
    opt.Step(1e-3, 1.0);
    return p.flat().clone();
  };
  EXPECT_TRUE(at::equal(run(1), run(2)));
}

// ---------------------------------------------------------------------------------------------
// GlobalL2Norm and ClipScale

at::Tensor Pattern(int64_t n, double seed) {
  // Deterministic values of mixed sign and magnitude.
  at::Tensor i = at::arange(n, at::kDouble);
  return (at::sin(i * 0.731 + seed) * (1.0 + at::remainder(i, 13.0))).to(at::kFloat);
}

double ReferenceNorm(const std::vector<at::Tensor>& flats) {
  double s = 0;
  for (const at::Tensor& t : flats) {
    at::Tensor d = t.to(at::kDouble).contiguous();
    const double* p = d.data_ptr<double>();
    for (int64_t i = 0; i < d.numel(); ++i) s += p[i] * p[i];
  }
  return std::sqrt(s);
}

TEST(GlobalL2NormTest, MatchesDoubleSumOfSquares) {
  std::vector<at::Tensor> flats;
  const int64_t sizes[] = {1, 17, 4095, 4096, 4097, 3 * 4096 + 17, 100003};
  double seed = 0.1;
  for (int64_t n : sizes) flats.push_back(Pattern(n, seed += 0.7));
  const double want = ReferenceNorm(flats);
  EXPECT_NEAR(GlobalL2Norm(flats), want, 1e-12 * want);
  // Each buffer alone, too.
  for (const at::Tensor& t : flats) {
    const double w = ReferenceNorm({t});
    EXPECT_NEAR(GlobalL2Norm({t}), w, 1e-12 * w) << "size " << t.numel();
  }
}

TEST(GlobalL2NormTest, ClosedFormCases) {
  EXPECT_EQ(GlobalL2Norm({}), 0.0);
  EXPECT_EQ(GlobalL2Norm({at::zeros({5000}, at::kFloat)}), 0.0);
  // 3-4-5 triangle split over two buffers.
  EXPECT_DOUBLE_EQ(GlobalL2Norm({at::full({1}, 3.0f), at::full({1}, 4.0f)}), 5.0);
  // n ones: sqrt(n), with n not a multiple of the 4096 block.
  EXPECT_DOUBLE_EQ(GlobalL2Norm({at::ones({10007}, at::kFloat)}), std::sqrt(10007.0));
  // Empty tensor contributes nothing.
  EXPECT_DOUBLE_EQ(GlobalL2Norm({at::empty({0}, at::kFloat), at::full({4}, 0.5f)}), 1.0);
}

TEST(GlobalL2NormTest, BitwiseIndependentOfThreadCount) {
  std::vector<at::Tensor> flats = {Pattern(300001, 0.3), Pattern(4097, 1.1),
                                   Pattern(70000, 2.5)};
  double one, two;
  {
    ThreadCountGuard guard;
    at::set_num_threads(1);
    one = GlobalL2Norm(flats);
    at::set_num_threads(2);
    two = GlobalL2Norm(flats);
  }
  EXPECT_EQ(one, two);  // bitwise, not approximately
  EXPECT_NEAR(one, ReferenceNorm(flats), 1e-12 * one);
}

TEST(ClipScaleTest, OffWhenMaxNormNotPositive) {
  EXPECT_EQ(ClipScale(123.0, 0.0), 1.0);
  EXPECT_EQ(ClipScale(123.0, -1.0), 1.0);
  EXPECT_EQ(ClipScale(0.0, 0.0), 1.0);
}

TEST(ClipScaleTest, MinOfOneAndMaxOverNormPlusEpsilon) {
  EXPECT_DOUBLE_EQ(ClipScale(4.0, 1.0), 1.0 / (4.0 + 1e-6));
  EXPECT_DOUBLE_EQ(ClipScale(10.0, 2.5), 2.5 / (10.0 + 1e-6));
  EXPECT_DOUBLE_EQ(ClipScale(1.0, 1.0), 1.0 / (1.0 + 1e-6));  // just below 1 at the boundary
  EXPECT_LT(ClipScale(1.0, 1.0), 1.0);
  EXPECT_EQ(ClipScale(0.5, 1.0), 1.0);
  EXPECT_EQ(ClipScale(0.0, 1.0), 1.0);
  EXPECT_EQ(ClipScale(1e-9, 1e-3), 1.0);
}

// ---------------------------------------------------------------------------------------------
// StateDict / LoadStateDict

TEST(AdamWStateTest, StateDictNamesShapesAndStep) {
  TwoGroups model;
  AdamW adamw(model.Groups(), AdamWOptions{});
  model.SetGrads(1);
  adamw.Step(1e-3, 1.0);
  adamw.Step(1e-3, 1.0);
  const StateList state = adamw.StateDict();
  std::set<std::string> names;
  for (const auto& [name, t] : state) EXPECT_TRUE(names.insert(name).second) << "dup " << name;
  const std::set<std::string> want = {
      "exp_avg.h.0.w", "exp_avg_sq.h.0.w", "exp_avg.h.1.w", "exp_avg_sq.h.1.w",
      "exp_avg.h.0.b", "exp_avg_sq.h.0.b", "exp_avg.ln.g",  "exp_avg_sq.ln.g",
      "step"};
  EXPECT_EQ(names, want);
  std::map<std::string, at::Tensor> by_name(state.begin(), state.end());
  const at::Tensor& step = by_name.at("step");
  EXPECT_EQ(step.scalar_type(), at::kLong);
  EXPECT_EQ(step.numel(), 1);
  EXPECT_EQ(step.item<int64_t>(), 2);
  for (const FlatBuffer* buf : {&model.decay_params, &model.plain_params}) {
    for (const auto& e : buf->entries()) {
      for (const std::string prefix : {"exp_avg.", "exp_avg_sq."}) {
        const at::Tensor& t = by_name.at(prefix + e.name);
        EXPECT_EQ(t.sizes().vec(), e.shape) << prefix + e.name;
        EXPECT_EQ(t.scalar_type(), at::kFloat);
      }
    }
  }
  // Second moments are non-negative; nonzero gradients made them positive somewhere.
  EXPECT_GE(by_name.at("exp_avg_sq.h.1.w").min().item<float>(), 0.0f);
  EXPECT_GT(by_name.at("exp_avg_sq.h.1.w").max().item<float>(), 0.0f);
}

TEST(AdamWStateTest, FreshOptimizerStateIsZeroAtStepZero) {
  TwoGroups model;
  AdamW adamw(model.Groups(), AdamWOptions{});
  EXPECT_EQ(adamw.steps(), 0);
  for (const auto& [name, t] : adamw.StateDict()) {
    if (name == "step") {
      EXPECT_EQ(t.item<int64_t>(), 0);
    } else {
      EXPECT_EQ(at::count_nonzero(t).item<int64_t>(), 0) << name;
    }
  }
}

TEST(AdamWStateTest, LoadStateDictRoundTripGivesIdenticalSubsequentSteps) {
  TwoGroups a;
  AdamW opt_a(a.Groups(), AdamWOptions{});
  for (int t = 1; t <= 2; ++t) {
    a.SetGrads(t);
    opt_a.Step(1e-2, 0.5);
  }
  // A fresh model with a's parameters and a fresh optimizer loaded from a's (copied) state.
  TwoGroups b;
  b.decay_params.flat().copy_(a.decay_params.flat());
  b.plain_params.flat().copy_(a.plain_params.flat());
  AdamW opt_b(b.Groups(), AdamWOptions{});
  ASSERT_TRUE(opt_b.LoadStateDict(CloneState(opt_a.StateDict())).ok());
  EXPECT_EQ(opt_b.steps(), 2);
  ExpectStatesEqual(opt_a.StateDict(), opt_b.StateDict());
  for (int t = 3; t <= 5; ++t) {
    a.SetGrads(t);
    b.SetGrads(t);
    opt_a.Step(7e-3, 1.0);
    opt_b.Step(7e-3, 1.0);
  }
  EXPECT_EQ(opt_b.steps(), 5);
  EXPECT_TRUE(at::equal(a.decay_params.flat(), b.decay_params.flat()));
  EXPECT_TRUE(at::equal(a.plain_params.flat(), b.plain_params.flat()));
  ExpectStatesEqual(opt_a.StateDict(), opt_b.StateDict());
}

TEST(AdamWStateTest, LoadedStateIsCopiedNotAliased) {
  TwoGroups a;
  AdamW opt_a(a.Groups(), AdamWOptions{});
  a.SetGrads(1);
  opt_a.Step(1e-2, 1.0);
  StateList saved = CloneState(opt_a.StateDict());
  TwoGroups b;
  AdamW opt_b(b.Groups(), AdamWOptions{});
  ASSERT_TRUE(opt_b.LoadStateDict(saved).ok());
  const StateList loaded = CloneState(opt_b.StateDict());
  for (auto& [name, t] : saved) t.fill_(0);  // mutating the source afterwards changes nothing
  ExpectStatesEqual(opt_b.StateDict(), loaded);
}

// A state list with one entry replaced (or removed when `replacement` is undefined).
StateList Modified(const StateList& state, const std::string& name, const at::Tensor& replacement) {
  StateList out;
  bool found = false;
  for (const auto& [n, t] : state) {
    if (n == name) {
      found = true;
      if (replacement.defined()) out.emplace_back(n, replacement);
    } else {
      out.emplace_back(n, t.clone());
    }
  }
  EXPECT_TRUE(found) << name;
  return out;
}

class AdamWBadStateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // Source state: 3 steps of a different run, so every valid entry differs from the target's.
    source_opt_ = std::make_unique<AdamW>(source_.Groups(), AdamWOptions{});
    for (int t = 1; t <= 3; ++t) {
      source_.SetGrads(t + 20);
      source_opt_->Step(2e-2, 1.0);
    }
    target_opt_ = std::make_unique<AdamW>(target_.Groups(), AdamWOptions{});
    target_.SetGrads(1);
    target_opt_->Step(1e-2, 1.0);
    before_ = CloneState(target_opt_->StateDict());
    params_before_ = target_.decay_params.flat().clone();
  }

  // Loading `bad` must fail with kDataLoss and leave the target exactly as it was.
  void ExpectRejectedWithoutChange(const StateList& bad) {
    const absl::Status s = target_opt_->LoadStateDict(bad);
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
    EXPECT_EQ(target_opt_->steps(), 1);
    ExpectStatesEqual(target_opt_->StateDict(), before_);
    EXPECT_TRUE(at::equal(target_.decay_params.flat(), params_before_));
  }

  StateList Source() const { return CloneState(source_opt_->StateDict()); }

  TwoGroups source_, target_;
  std::unique_ptr<AdamW> source_opt_, target_opt_;
  StateList before_;
  at::Tensor params_before_;
};

TEST_F(AdamWBadStateTest, MissingLastMomentTensor) {
  // The last tensor in the layout order: everything before it is valid and would be copied by a
  // non-atomic loader.
  ExpectRejectedWithoutChange(Modified(Source(), "exp_avg_sq.ln.g", at::Tensor()));
}

TEST_F(AdamWBadStateTest, MissingFirstMomentTensor) {
  ExpectRejectedWithoutChange(Modified(Source(), "exp_avg.h.0.w", at::Tensor()));
}

TEST_F(AdamWBadStateTest, WrongShape) {
  ExpectRejectedWithoutChange(Modified(Source(), "exp_avg.ln.g", at::zeros({6}, at::kFloat)));
  ExpectRejectedWithoutChange(
      Modified(Source(), "exp_avg_sq.h.1.w", at::zeros({6, 4}, at::kFloat)));  // transposed
  ExpectRejectedWithoutChange(
      Modified(Source(), "exp_avg.h.0.w", at::zeros({15}, at::kFloat)));  // same numel, flat
}

TEST_F(AdamWBadStateTest, MissingStep) {
  ExpectRejectedWithoutChange(Modified(Source(), "step", at::Tensor()));
}

TEST_F(AdamWBadStateTest, NegativeStep) {
  ExpectRejectedWithoutChange(Modified(Source(), "step", at::scalar_tensor(-1, at::kLong)));
}

TEST_F(AdamWBadStateTest, StepWithSeveralElements) {
  ExpectRejectedWithoutChange(Modified(Source(), "step", at::full({2}, 3, at::kLong)));
}

TEST_F(AdamWBadStateTest, EmptyState) { ExpectRejectedWithoutChange({}); }

TEST_F(AdamWBadStateTest, ValidSourceStillLoadsAfterFailures) {
  ExpectRejectedWithoutChange(Modified(Source(), "step", at::Tensor()));
  ASSERT_TRUE(target_opt_->LoadStateDict(Source()).ok());
  EXPECT_EQ(target_opt_->steps(), 3);
  ExpectStatesEqual(target_opt_->StateDict(), source_opt_->StateDict());
}

}  // namespace
}  // namespace shoal::parallel
