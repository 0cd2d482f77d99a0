#include "memory/cuda_backend.h"

#include <cuda_runtime.h>

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace shoal::memory {
namespace {

absl::Status CudaStatus(cudaError_t e, const char* call) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("CUDA: ", call, ": ", cudaGetErrorString(e)));
}
#define SHOAL_CUDA(call) CudaStatus((call), #call)

cudaStream_t Stream(void* s) { return static_cast<cudaStream_t>(s); }
cudaEvent_t Event(void* e) { return static_cast<cudaEvent_t>(e); }

}  // namespace

int CudaDeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // no driver or no device: not an error for the caller
    return 0;
  }
  return n;
}

absl::StatusOr<std::string> CudaDeviceDescription() {
  int device = 0;
  absl::Status s = SHOAL_CUDA(cudaGetDevice(&device));
  if (!s.ok()) return s;
  cudaDeviceProp prop;
  s = SHOAL_CUDA(cudaGetDeviceProperties(&prop, device));
  if (!s.ok()) return s;
  return absl::StrFormat("%s, %.1f GiB, sm_%d%d, %d SMs", prop.name,
                         prop.totalGlobalMem / double(1 << 30), prop.major, prop.minor,
                         prop.multiProcessorCount);
}

absl::Status CudaMemoryInfo(int64_t* free_bytes, int64_t* total_bytes) {
  size_t f = 0, t = 0;
  absl::Status s = SHOAL_CUDA(cudaMemGetInfo(&f, &t));
  *free_bytes = static_cast<int64_t>(f);
  *total_bytes = static_cast<int64_t>(t);
  return s;
}

absl::StatusOr<void*> AllocatePinnedHost(int64_t bytes) {
  void* p = nullptr;
  const cudaError_t e = cudaHostAlloc(&p, static_cast<size_t>(bytes), cudaHostAllocDefault);
  if (e != cudaSuccess) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "CUDA: cudaHostAlloc of ", bytes, " bytes of pinned host memory: ", cudaGetErrorString(e)));
  }
  return p;
}

void FreePinnedHost(void* p) {
  if (p != nullptr) (void)cudaFreeHost(p);
}

absl::StatusOr<std::unique_ptr<CudaDeviceBackend>> CudaDeviceBackend::Create(
    void* compute_stream) {
  cudaStream_t in = nullptr, out = nullptr;
  // Non-blocking: the copy streams do not synchronise with the legacy default stream, so
  // transfers overlap kernels even when the caller computes on stream 0.
  absl::Status s = SHOAL_CUDA(cudaStreamCreateWithFlags(&in, cudaStreamNonBlocking));
  if (!s.ok()) return s;
  s = SHOAL_CUDA(cudaStreamCreateWithFlags(&out, cudaStreamNonBlocking));
  if (!s.ok()) {
    (void)cudaStreamDestroy(in);
    return s;
  }
  return std::unique_ptr<CudaDeviceBackend>(new CudaDeviceBackend(compute_stream, in, out));
}

CudaDeviceBackend::~CudaDeviceBackend() {
  (void)cudaStreamSynchronize(Stream(in_));
  (void)cudaStreamSynchronize(Stream(out_));
  // The caller's kernels may still read slots: wait for the compute stream too.
  (void)cudaStreamSynchronize(Stream(compute_));
  for (void* e : events_) (void)cudaEventDestroy(Event(e));
  if (memory_ != nullptr) (void)cudaFree(memory_);
  (void)cudaStreamDestroy(Stream(in_));
  (void)cudaStreamDestroy(Stream(out_));
}

std::string CudaDeviceBackend::name() const {
  int device = 0;
  (void)cudaGetDevice(&device);
  return absl::StrCat("cuda:", device);
}

absl::StatusOr<void*> CudaDeviceBackend::Allocate(int64_t bytes, int num_events) {
  if (memory_ != nullptr) return absl::FailedPreconditionError("cuda backend: allocated twice");
  const cudaError_t e = cudaMalloc(&memory_, static_cast<size_t>(bytes));
  if (e != cudaSuccess) {
    memory_ = nullptr;
    return absl::ResourceExhaustedError(absl::StrCat(
        "CUDA: cudaMalloc of ", bytes, " bytes of chunk slots: ", cudaGetErrorString(e)));
  }
  for (int i = 0; i < num_events; ++i) {
    cudaEvent_t event = nullptr;
    absl::Status s = SHOAL_CUDA(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    if (!s.ok()) return s;
    events_.push_back(event);
  }
  return memory_;
}

absl::Status CudaDeviceBackend::CopyIn(void* device_dst, const void* host_src, int64_t bytes) {
  return SHOAL_CUDA(cudaMemcpyAsync(device_dst, host_src, static_cast<size_t>(bytes),
                                    cudaMemcpyHostToDevice, Stream(in_)));
}

absl::Status CudaDeviceBackend::CopyOut(void* host_dst, const void* device_src, int64_t bytes) {
  return SHOAL_CUDA(cudaMemcpyAsync(host_dst, device_src, static_cast<size_t>(bytes),
                                    cudaMemcpyDeviceToHost, Stream(out_)));
}

absl::Status CudaDeviceBackend::RecordOnIn(int e) {
  return SHOAL_CUDA(cudaEventRecord(Event(events_.at(e)), Stream(in_)));
}

absl::Status CudaDeviceBackend::RecordOnOut(int e) {
  return SHOAL_CUDA(cudaEventRecord(Event(events_.at(e)), Stream(out_)));
}

absl::Status CudaDeviceBackend::RecordOnCompute(int e) {
  return SHOAL_CUDA(cudaEventRecord(Event(events_.at(e)), Stream(compute_)));
}

absl::Status CudaDeviceBackend::InWaits(int e) {
  return SHOAL_CUDA(cudaStreamWaitEvent(Stream(in_), Event(events_.at(e)), 0));
}

absl::Status CudaDeviceBackend::OutWaits(int e) {
  return SHOAL_CUDA(cudaStreamWaitEvent(Stream(out_), Event(events_.at(e)), 0));
}

absl::Status CudaDeviceBackend::ComputeWaits(int e) {
  return SHOAL_CUDA(cudaStreamWaitEvent(Stream(compute_), Event(events_.at(e)), 0));
}

absl::Status CudaDeviceBackend::SynchronizeCopies() {
  absl::Status s = SHOAL_CUDA(cudaStreamSynchronize(Stream(in_)));
  if (!s.ok()) return s;
  return SHOAL_CUDA(cudaStreamSynchronize(Stream(out_)));
}

}  // namespace shoal::memory
