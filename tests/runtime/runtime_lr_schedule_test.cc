// Tests for runtime/lr_schedule.h: linear warm-up, cosine decay to lr * min_lr_ratio, checked
// against closed-form values and shape invariants (monotonicity, finiteness).
#include <cmath>
#include <cstdint>

#include <gtest/gtest.h>

#include "runtime/config.h"
#include "runtime/lr_schedule.h"

namespace shoal::runtime {
namespace {

OptimConfig Optim(double lr, double min_lr_ratio, int64_t warmup) {
  OptimConfig o;
  o.lr = lr;
  o.min_lr_ratio = min_lr_ratio;
  o.warmup_steps = warmup;
  return o;
}

// Absolute tolerance: a few ulps of the peak.
double Tol(const OptimConfig& o) { return 1e-12 * o.lr; }

TEST(LrScheduleTest, WarmupIsLinearFromLrOverWarmupToLr) {
  const OptimConfig o = Optim(6e-4, 0.1, 10);
  const int64_t total = 100;
  for (int64_t step = 0; step < o.warmup_steps; ++step) {
    EXPECT_NEAR(LearningRateAt(step, o, total), o.lr * (step + 1) / 10.0, Tol(o)) << step;
  }
  EXPECT_NEAR(LearningRateAt(0, o, total), 6e-5, Tol(o));
  EXPECT_NEAR(LearningRateAt(o.warmup_steps - 1, o, total), o.lr, Tol(o));
}

TEST(LrScheduleTest, WarmupStrictlyIncreasingAndPositive) {
  const OptimConfig o = Optim(1e-3, 0.1, 37);
  double prev = 0;
  for (int64_t step = 0; step < o.warmup_steps; ++step) {
    const double lr = LearningRateAt(step, o, 500);
    EXPECT_GT(lr, prev) << step;
    EXPECT_LE(lr, o.lr * (1 + 1e-12)) << step;
    prev = lr;
  }
}

TEST(LrScheduleTest, PeakAtTheFirstStepAfterWarmup) {
  const OptimConfig o = Optim(3e-4, 0.1, 20);
  EXPECT_NEAR(LearningRateAt(20, o, 200), 3e-4, Tol(o));
}

TEST(LrScheduleTest, FloorAtAndAfterTheLastStep) {
  const OptimConfig o = Optim(6e-4, 0.1, 10);
  const int64_t total = 110;
  const double floor = 6e-5;
  EXPECT_NEAR(LearningRateAt(total, o, total), floor, Tol(o));
  EXPECT_NEAR(LearningRateAt(total + 1, o, total), floor, Tol(o));
  EXPECT_NEAR(LearningRateAt(total * 10, o, total), floor, Tol(o));
  // One step before the end it is still (slightly) above the floor.
  EXPECT_GT(LearningRateAt(total - 1, o, total), floor);
}

TEST(LrScheduleTest, CosineMidpointAndQuarterPoints) {
  const OptimConfig o = Optim(1e-3, 0.2, 10);
  const int64_t total = 210;  // 200 decay steps
  const double peak = 1e-3, floor = 2e-4;
  EXPECT_NEAR(LearningRateAt(110, o, total), (peak + floor) / 2, Tol(o));
  // (1 + cos(pi/4)) / 2 and (1 + cos(3 pi/4)) / 2 of the way.
  const double c = std::sqrt(0.5);
  EXPECT_NEAR(LearningRateAt(60, o, total), floor + (peak - floor) * (1 + c) / 2, Tol(o));
  EXPECT_NEAR(LearningRateAt(160, o, total), floor + (peak - floor) * (1 - c) / 2, Tol(o));
  // Symmetry of the cosine about the midpoint: lr(mid - k) + lr(mid + k) = peak + floor.
  for (int64_t k = 0; k <= 100; k += 7) {
    EXPECT_NEAR(LearningRateAt(110 - k, o, total) + LearningRateAt(110 + k, o, total),
                peak + floor, Tol(o))
        << k;
  }
}

TEST(LrScheduleTest, MonotoneNonIncreasingAfterWarmup) {
  for (int64_t warmup : {0, 1, 10, 99}) {
    const OptimConfig o = Optim(6e-4, 0.1, warmup);
    const int64_t total = 100;
    double prev = LearningRateAt(warmup, o, total);
    for (int64_t step = warmup + 1; step <= total + 20; ++step) {
      const double lr = LearningRateAt(step, o, total);
      EXPECT_LE(lr, prev) << "warmup " << warmup << " step " << step;
      EXPECT_GE(lr, 6e-5 - Tol(o)) << "warmup " << warmup << " step " << step;
      prev = lr;
    }
  }
}

TEST(LrScheduleTest, ZeroWarmupStartsAtPeakWithoutDivisionByZero) {
  const OptimConfig o = Optim(6e-4, 0.1, 0);
  const double lr0 = LearningRateAt(0, o, 100);
  EXPECT_TRUE(std::isfinite(lr0));
  EXPECT_NEAR(lr0, 6e-4, Tol(o));
  EXPECT_NEAR(LearningRateAt(50, o, 100), (6e-4 + 6e-5) / 2, Tol(o));
  EXPECT_NEAR(LearningRateAt(100, o, 100), 6e-5, Tol(o));
  // Degenerate runs: zero or one total step.
  EXPECT_TRUE(std::isfinite(LearningRateAt(0, o, 0)));
  EXPECT_NEAR(LearningRateAt(0, o, 0), 6e-4, Tol(o));
  EXPECT_NEAR(LearningRateAt(0, o, 1), 6e-4, Tol(o));
  EXPECT_NEAR(LearningRateAt(1, o, 1), 6e-5, Tol(o));
}

TEST(LrScheduleTest, WarmupAsLongAsTheRunDoesNotDivideByZero) {
  const OptimConfig o = Optim(1e-3, 0.1, 50);
  EXPECT_NEAR(LearningRateAt(49, o, 50), 1e-3, Tol(o));
  const double at_end = LearningRateAt(50, o, 50);
  EXPECT_TRUE(std::isfinite(at_end));
  EXPECT_NEAR(at_end, 1e-3, Tol(o));  // progress 0 / max(1, 0) = 0: still the peak
  EXPECT_NEAR(LearningRateAt(51, o, 50), 1e-4, Tol(o));
}

TEST(LrScheduleTest, MinLrRatioExtremes) {
  const OptimConfig zero = Optim(1e-3, 0.0, 5);
  EXPECT_NEAR(LearningRateAt(105, zero, 105), 0.0, Tol(zero));
  EXPECT_NEAR(LearningRateAt(55, zero, 105), 5e-4, Tol(zero));
  const OptimConfig one = Optim(1e-3, 1.0, 5);
  for (int64_t step = 5; step <= 120; step += 5) {
    EXPECT_NEAR(LearningRateAt(step, one, 105), 1e-3, Tol(one)) << step;
  }
}

}  // namespace
}  // namespace shoal::runtime
