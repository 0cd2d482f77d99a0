// The device tier's CUDA backend (memory/device_cache.h): the slots are one cudaMalloc, the in
// and out queues are non-blocking streams of their own (so loads and write-backs run in both
// directions of the link at once), the compute queue is the caller's stream, and the events are
// CUDA events without timing. Built only where the CUDA toolkit is (SHOAL_HAVE_CUDA);
// the header names no CUDA type, so callers need no CUDA headers.
#ifndef SHOAL_MEMORY_CUDA_BACKEND_H_
#define SHOAL_MEMORY_CUDA_BACKEND_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "memory/device_cache.h"

namespace shoal::memory {

// Devices the CUDA runtime sees; 0 where there is no driver or no device (never an error).
int CudaDeviceCount();
// "NVIDIA H100 80GB HBM3, 79.2 GiB, sm_90" for the current device, or the runtime's error.
absl::StatusOr<std::string> CudaDeviceDescription();
// Free and total bytes of the current device (cudaMemGetInfo).
absl::Status CudaMemoryInfo(int64_t* free_bytes, int64_t* total_bytes);

// Page-locked host memory (cudaHostAlloc), so copies to and from it run asynchronously at full
// speed. Errors name the size.
absl::StatusOr<void*> AllocatePinnedHost(int64_t bytes);
void FreePinnedHost(void* p);

class CudaDeviceBackend final : public DeviceBackend {
 public:
  // `compute_stream`: the cudaStream_t the caller's kernels run on (nullptr: the legacy default
  // stream), on the current device. Errors: the CUDA runtime's, naming the call.
  static absl::StatusOr<std::unique_ptr<CudaDeviceBackend>> Create(void* compute_stream);
  ~CudaDeviceBackend() override;

  std::string name() const override;
  absl::StatusOr<void*> Allocate(int64_t bytes, int num_events) override;
  absl::Status CopyIn(void* device_dst, const void* host_src, int64_t bytes) override;
  absl::Status CopyOut(void* host_dst, const void* device_src, int64_t bytes) override;
  absl::Status RecordOnIn(int e) override;
  absl::Status RecordOnOut(int e) override;
  absl::Status RecordOnCompute(int e) override;
  absl::Status InWaits(int e) override;
  absl::Status OutWaits(int e) override;
  absl::Status ComputeWaits(int e) override;
  absl::Status SynchronizeCopies() override;

 private:
  CudaDeviceBackend(void* compute_stream, void* in_stream, void* out_stream)
      : compute_(compute_stream), in_(in_stream), out_(out_stream) {}
  void* compute_;  // cudaStream_t
  void* in_;       // cudaStream_t, owned
  void* out_;      // cudaStream_t, owned
  void* memory_ = nullptr;
  std::vector<void*> events_;  // cudaEvent_t, owned
};

}  // namespace shoal::memory

#endif  // SHOAL_MEMORY_CUDA_BACKEND_H_
