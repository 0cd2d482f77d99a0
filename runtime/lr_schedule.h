// Learning-rate schedule: linear warm-up, then cosine decay to a floor.
//   step < warmup:  lr * (step + 1) / warmup
//   otherwise:      floor + (lr - floor) * (1 + cos(pi * p)) / 2,
//                   p = min(1, (step - warmup) / max(1, steps - warmup)),  floor = lr * min_lr_ratio
// `step` counts optimizer steps from 0. Pure function; thread-safe.
#ifndef SHOAL_RUNTIME_LR_SCHEDULE_H_
#define SHOAL_RUNTIME_LR_SCHEDULE_H_

#include <cstdint>

#include "runtime/config.h"

namespace shoal::runtime {

double LearningRateAt(int64_t step, const OptimConfig& optim, int64_t total_steps);

}  // namespace shoal::runtime

#endif  // SHOAL_RUNTIME_LR_SCHEDULE_H_
