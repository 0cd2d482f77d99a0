// The worker's device profile, measured in a few seconds at start: fp32 and bf16 GEMM rates,
// memory per tier (host RAM available, disk free under a path; GPU memory on a CUDA build with a
// GPU), host memcpy bandwidth, core count. Cached per machine (host name, CPU model, cores) in
// $SHOAL_CACHE_DIR or ~/.cache/shoal/profile.json, unthrottled; the round trip and bandwidth to
// the coordinator are measured by the caller on every start (they depend on the network).
//
// `throttle` >= 1 slows this worker on purpose by that factor (tests and benchmarks of
// heterogeneity on one machine): the machine's rates are divided by it, and Throttle::After()
// sleeps (factor - 1) x the time of the work it follows (WorkClock: its wall time, but no more
// than the CPU time the process spent on it).
#ifndef SHOAL_RUNTIME_PROFILER_H_
#define SHOAL_RUNTIME_PROFILER_H_

#include <chrono>
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

// How long a piece of work took as a Throttle counts it: its wall time from Start() to
// Seconds(), but no more than the CPU time this process spent meanwhile (all its threads). Several
// throttled ranks share one machine's cores as several devices; time a rank's work spent waiting
// for a core another rank held is then not multiplied by the throttle, since the device it stands
// for would not have waited. (Counted as wall time, that wait was: in `shoal bench swarm` a
// stage-0 micro-batch, forward and backward, that computes in 16 ms alone took 30 ms among the
// run's 8 processes, 120 ms throttled 4×.) Work on several threads at once takes more CPU time
// than wall time: the wall time counts, as before. The process's other threads (a peer receiving
// its next call) count too, so the work is never counted as less than its own CPU time.
// Plain value; Seconds() may be called any number of times.
class WorkClock {
 public:
  static WorkClock Start();
  double Seconds() const;
  // The process's CPU seconds so far (CLOCK_PROCESS_CPUTIME_ID; 0 where it cannot be read).
  static double ProcessCpuSeconds();

 private:
  WorkClock() = default;
  std::chrono::steady_clock::time_point wall0_;
  double cpu0_ = 0;
};

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
  // After(work.Seconds()): the work timed from `work`'s start to now.
  double After(const WorkClock& work) const { return After(work.Seconds()); }
  double factor() const { return factor_; }

 private:
  double factor_;
};

}  // namespace shoal::runtime

#endif  // SHOAL_RUNTIME_PROFILER_H_
