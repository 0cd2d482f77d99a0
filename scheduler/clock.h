// Time for the coordinator's state machine. The live coordinator reads the system clock; the
// simulator and tests drive a manual one, so leases, layouts and throughput over time are
// computed by the same code either way.
#ifndef SHOAL_SCHEDULER_CLOCK_H_
#define SHOAL_SCHEDULER_CLOCK_H_

#include <atomic>
#include <cstdint>

namespace shoal::scheduler {

class Clock {
 public:
  virtual ~Clock() = default;
  // Milliseconds since the Unix epoch (a manual clock starts wherever it is set).
  virtual int64_t NowUnixMs() const = 0;
};

class SystemClock : public Clock {
 public:
  int64_t NowUnixMs() const override;
  static SystemClock* Get();  // process-wide instance
};

// Advanced by hand; thread-safe.
class ManualClock : public Clock {
 public:
  explicit ManualClock(int64_t start_unix_ms = 0) : now_(start_unix_ms) {}
  int64_t NowUnixMs() const override { return now_.load(); }
  void AdvanceMs(int64_t ms) { now_ += ms; }
  void SetMs(int64_t ms) { now_ = ms; }

 private:
  std::atomic<int64_t> now_;
};

}  // namespace shoal::scheduler

#endif  // SHOAL_SCHEDULER_CLOCK_H_
