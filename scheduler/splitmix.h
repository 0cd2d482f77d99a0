// splitmix64: a tiny generator whose sequence is fixed by its definition, unlike the standard
// library's distributions (implementation-defined), so the simulators' clusters, churn and
// virtual hashes are the same on every platform and compiler. Not thread-safe.
#ifndef SHOAL_SCHEDULER_SPLITMIX_H_
#define SHOAL_SCHEDULER_SPLITMIX_H_

#include <cstdint>

namespace shoal::scheduler {

class SplitMix {
 public:
  explicit SplitMix(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Uniform in [0, 1) with 53 random bits.
  double Uniform() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }

 private:
  uint64_t state_;
};

}  // namespace shoal::scheduler

#endif  // SHOAL_SCHEDULER_SPLITMIX_H_
