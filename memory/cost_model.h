// The memory plan's cost model (issue 7, ALGORITHMS.md §4, after ProTrain): from what the warm-up
// step measured -- its compute time, the disk tier's bandwidth, the memory outside the chunks --
// and what the trace simulation predicts -- chunk loads and write-backs per step -- it picks the
// prefetch depth and predicts the steady-state step time and peak memory. Plain C++, no tensors:
// the chunk manager measures, this decides.
//
// The model: a step is `accesses` chunk accesses spread evenly over `compute_seconds`; every
// load and write-back moves one chunk at the measured bandwidth on the I/O threads.
//  * Prefetch depth: a chunk must be asked for at least one load time before its use, i.e.
//    ceil(load time / compute per access) accesses ahead, plus one for the access in flight;
//    at most the chunks that are free while the widest piece is pinned, at least 1.
//  * Step time: between the I/O fully hidden behind compute, max(compute, io), and not hidden at
//    all, compute + io. The plan predicts the first when the prefetch depth it wants fits,
//    else interpolates by the share of the loads the depth can hide.
//  * Peak memory: the chunk budget (held in full in steady state) plus the non-chunk peak the
//    warm-up saw (activations, the framework, the process).
#ifndef SHOAL_MEMORY_COST_MODEL_H_
#define SHOAL_MEMORY_COST_MODEL_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace shoal::memory {

struct WarmupProfile {
  double compute_seconds = 0;    // the warm-up step's wall time minus its waits for chunk I/O
  int64_t accesses = 0;          // chunk acquisitions per step (the trace's length)
  double read_bytes_per_s = 0;   // the disk tier's, as measured (loads)
  double write_bytes_per_s = 0;  // the disk tier's, as measured (write-backs)
  int64_t chunk_bytes = 0;
  int64_t loads_per_step = 0;       // by simulation of the trace at the store's capacity
  int64_t write_backs_per_step = 0;
  int capacity_chunks = 0;          // chunks the host budget holds
  int pinned_chunks = 0;            // the most held at once by the widest piece
  int64_t chunk_budget_bytes = 0;   // every chunk store's budget together
  int64_t non_chunk_peak_bytes = 0; // the warm-up's largest RSS minus resident chunks
};

struct MemoryPlanEstimate {
  int prefetch_depth = 1;
  double io_seconds = 0;          // loads and write-backs per step at the measured bandwidths
  double step_seconds = 0;        // predicted steady-state step time
  double step_seconds_hidden = 0; // if every transfer overlapped compute
  double step_seconds_serial = 0; // if none did
  int64_t peak_bytes = 0;         // chunk budget + non-chunk peak
  std::string Describe() const;   // one line for the log
};

// Errors: kInvalidArgument naming the first field that is out of range (negative times or
// counts, a zero chunk size or bandwidth, no accesses, fewer capacity chunks than pinned ones).
absl::StatusOr<MemoryPlanEstimate> PlanFromProfile(const WarmupProfile& profile);

}  // namespace shoal::memory

#endif  // SHOAL_MEMORY_COST_MODEL_H_
