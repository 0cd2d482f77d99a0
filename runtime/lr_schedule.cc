#include "runtime/lr_schedule.h"

#include <algorithm>
#include <cmath>

namespace shoal::runtime {

double LearningRateAt(int64_t step, const OptimConfig& optim, int64_t total_steps) {
  const double peak = optim.lr;
  const double floor = peak * optim.min_lr_ratio;
  if (step < optim.warmup_steps) {
    return peak * static_cast<double>(step + 1) / static_cast<double>(optim.warmup_steps);
  }
  const double span = static_cast<double>(std::max<int64_t>(1, total_steps - optim.warmup_steps));
  const double progress = std::min(1.0, static_cast<double>(step - optim.warmup_steps) / span);
  return floor + 0.5 * (1.0 + std::cos(M_PI * progress)) * (peak - floor);
}

}  // namespace shoal::runtime
