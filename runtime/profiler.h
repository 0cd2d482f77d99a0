// The worker's device profile, measured in a few seconds at start: fp32 and bf16 GEMM rates,
// memory per tier (host RAM available, disk free under a path; GPU memory on a CUDA build with a
// GPU), host memcpy bandwidth, core count. Cached per machine (host name, CPU model, cores,
// throttle) in $SHOAL_CACHE_DIR or ~/.cache/shoal/profile.json; the round trip and bandwidth to the
// coordinator are measured by the caller on every start (they depend on the network).
//
// `throttle` >= 1 slows this worker on purpose by that factor (tests and benchmarks of
// heterogeneity on one machine): measured rates are divided by it, and Throttle::After() sleeps
// (factor - 1) x the time of the work it follows.
#ifndef SHOAL_RUNTIME_PROFILER_H_
#define SHOAL_RUNTIME_PROFILER_H_

#include <string>

#include "absl/status/statusor.h"
#include "proto/coordinator.pb.h"

namespace shoal::runtime {

struct ProfileOptions {
  double throttle = 1.0;
  std::string disk_path = ".";    // the disk tier's folder (free bytes counted there)
  bool refresh = false;           // measure again even when cached
  double seconds = 2.0;           // time budget for the GEMM measurements
};

// kInvalidArgument for throttle < 1 or a disk path that does not exist.
absl::StatusOr<v1::DeviceProfile> ProfileDevice(const ProfileOptions& options);

}  // namespace shoal::runtime

#endif  // SHOAL_RUNTIME_PROFILER_H_
