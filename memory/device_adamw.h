// AdamW on device-resident chunks (issue 7: "device AdamW for device-resident ones"): the same
// per-element formula as the host optimizer (memory/adamw_math.h), one thread per element,
// queued on a stream so it runs where the chunk is, between the kernels that produce the gradient
// and those that next read the parameters. Built only with the CUDA toolkit (SHOAL_HAVE_CUDA).
#ifndef SHOAL_MEMORY_DEVICE_ADAMW_H_
#define SHOAL_MEMORY_DEVICE_ADAMW_H_

#include <cstdint>

#include "absl/status/status.h"
#include "memory/adamw_math.h"

namespace shoal::memory {

// Queues the update of elements [0, n) of p, m, v (device pointers) from gradient g on `stream`
// (a cudaStream_t; nullptr: the legacy default stream). Errors: kInvalidArgument for n < 0 or a
// null pointer with n > 0; the launch error of the CUDA runtime.
absl::Status DeviceAdamW(const AdamWConstants& k, const float* g, float* p, float* m, float* v,
                         int64_t n, void* stream);

}  // namespace shoal::memory

#endif  // SHOAL_MEMORY_DEVICE_ADAMW_H_
