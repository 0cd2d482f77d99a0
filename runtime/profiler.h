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

// kInvalidArgument for throttle < 1 (or not finite), a time budget <= 0, or a disk path that
// does not exist; each message names the option.
absl::StatusOr<v1::DeviceProfile> ProfileDevice(const ProfileOptions& options);

// The deliberate slow-down: after a piece of work that took `work_seconds`, After() sleeps
// (factor - 1) x that, so the work appears `factor` times slower to everyone downstream. A test
// device, not a scheduler: one machine can then play ranks of different speeds. Thread-safe.
class Throttle {
 public:
  // `factor` must be >= 1 and finite (CheckFactor says why not).
  explicit Throttle(double factor = 1.0) : factor_(factor) {}
  static absl::Status CheckFactor(double factor, const char* what);
  // Sleeps; returns the seconds slept (0 when factor is 1).
  double After(double work_seconds) const;
  double factor() const { return factor_; }

 private:
  double factor_;
};

}  // namespace shoal::runtime

#endif  // SHOAL_RUNTIME_PROFILER_H_
