// Standalone NCCL all-reduce check: NCCL + the CUDA runtime, nothing of shoal (the GPU machines
// lack shoal's build dependencies). Ranks are threads of this process, rank r on GPU r % ngpus,
// joined by ncclCommInitRank with one shared unique id.
//
//   nccl_allreduce_check [ranks] [max_bytes] [iterations]
//     ranks       default: 2, or the number of GPUs if larger. With fewer GPUs than ranks, ranks
//                 share a GPU; NCCL usually refuses that ("Duplicate GPU"), which is printed,
//                 and the check is rerun with one rank per GPU.
//     max_bytes   largest message, default 256 MiB (sizes 4 KiB, x4, ...)
//     iterations  timed all-reduces per size, default 20
//
// Each rank contributes (r+1) at every element, so a sum is N(N+1)/2 everywhere; the first
// all-reduce of every size is checked on the host. Prints one line per size (time, algorithm and
// bus bandwidth = 2(N-1)/N x bytes / time), then "RESULT: PASS" or "RESULT: FAIL ...".
// Exit status: 0 pass, 1 a check or call failed, 2 no usable GPU.
#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

namespace {

struct RankReport {
  std::string error;            // empty: fine
  std::vector<double> seconds;  // per size, average per all-reduce
};

#define CUDA_OR_RETURN(call)                                                             \
  do {                                                                                   \
    cudaError_t e_ = (call);                                                             \
    if (e_ != cudaSuccess) {                                                             \
      report.error = std::string(#call) + ": " + cudaGetErrorString(e_);                 \
      return;                                                                            \
    }                                                                                    \
  } while (0)
#define NCCL_OR_RETURN(call)                                                             \
  do {                                                                                   \
    ncclResult_t r_ = (call);                                                            \
    if (r_ != ncclSuccess) {                                                             \
      report.error = std::string(#call) + ": " + ncclGetErrorString(r_);                 \
      return;                                                                            \
    }                                                                                    \
  } while (0)

void RunRank(int rank, int nranks, int device, ncclUniqueId id, const std::vector<size_t>& sizes,
             int iterations, RankReport& report) {
  CUDA_OR_RETURN(cudaSetDevice(device));
  ncclComm_t comm;
  NCCL_OR_RETURN(ncclCommInitRank(&comm, nranks, id, rank));
  cudaStream_t stream;
  CUDA_OR_RETURN(cudaStreamCreate(&stream));
  const size_t max_count = sizes.back() / sizeof(float);
  float* buffer = nullptr;
  CUDA_OR_RETURN(cudaMalloc(&buffer, max_count * sizeof(float)));
  std::vector<float> host(max_count, static_cast<float>(rank + 1));
  const float want = nranks * (nranks + 1) / 2.0f;
  for (size_t bytes : sizes) {
    const size_t count = bytes / sizeof(float);
    CUDA_OR_RETURN(cudaMemcpy(buffer, host.data(), bytes, cudaMemcpyHostToDevice));
    NCCL_OR_RETURN(ncclAllReduce(buffer, buffer, count, ncclFloat, ncclSum, comm, stream));
    CUDA_OR_RETURN(cudaStreamSynchronize(stream));
    std::vector<float> got(count);
    CUDA_OR_RETURN(cudaMemcpy(got.data(), buffer, bytes, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < count; ++i) {
      if (got[i] != want) {
        report.error = "rank " + std::to_string(rank) + ": element " + std::to_string(i) +
                       " of a " + std::to_string(bytes) + "-byte all-reduce is " +
                       std::to_string(got[i]) + ", expected " + std::to_string(want);
        return;
      }
    }
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < iterations; ++i) {
      NCCL_OR_RETURN(ncclAllReduce(buffer, buffer, count, ncclFloat, ncclSum, comm, stream));
    }
    CUDA_OR_RETURN(cudaStreamSynchronize(stream));
    report.seconds.push_back(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() /
        iterations);
  }
  cudaFree(buffer);
  cudaStreamDestroy(stream);
  ncclCommDestroy(comm);
}

// Runs the check with `nranks` thread-ranks; true when every rank finished without error.
bool Check(int nranks, int ngpus, const std::vector<size_t>& sizes, int iterations) {
  std::printf("nccl check: %d rank%s on %d GPU%s (rank r on GPU r %% %d)\n", nranks,
              nranks == 1 ? "" : "s", ngpus, ngpus == 1 ? "" : "s", ngpus);
  ncclUniqueId id;
  if (ncclGetUniqueId(&id) != ncclSuccess) {
    std::printf("ncclGetUniqueId failed\n");
    return false;
  }
  std::vector<RankReport> reports(nranks);
  std::vector<std::thread> threads;
  for (int r = 0; r < nranks; ++r) {
    threads.emplace_back(RunRank, r, nranks, r % ngpus, id, std::cref(sizes), iterations,
                         std::ref(reports[r]));
  }
  for (auto& t : threads) t.join();
  bool ok = true;
  for (int r = 0; r < nranks; ++r) {
    if (!reports[r].error.empty()) {
      std::printf("rank %d: %s\n", r, reports[r].error.c_str());
      ok = false;
    }
  }
  if (!ok) return false;
  const double bus = nranks > 1 ? 2.0 * (nranks - 1) / nranks : 0.0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    double slowest = 0;
    for (const RankReport& rep : reports) slowest = std::max(slowest, rep.seconds[i]);
    std::printf("allreduce %10zu B  time %9.3f ms  algbw %8.2f GB/s  busbw %8.2f GB/s\n",
                sizes[i], slowest * 1e3, sizes[i] / slowest / 1e9, bus * sizes[i] / slowest / 1e9);
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  int version = 0;
  ncclGetVersion(&version);
  int runtime = 0;
  cudaRuntimeGetVersion(&runtime);
  std::printf("NCCL %d, CUDA runtime %d\n", version, runtime);
  int ngpus = 0;
  const cudaError_t e = cudaGetDeviceCount(&ngpus);
  if (e != cudaSuccess || ngpus == 0) {
    std::printf("no usable GPU (%s)\nRESULT: SKIP\n",
                e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
    return 2;
  }
  for (int d = 0; d < ngpus; ++d) {
    cudaDeviceProp p;
    cudaGetDeviceProperties(&p, d);
    std::printf("GPU %d: %s, %.1f GiB\n", d, p.name, p.totalGlobalMem / double(1 << 30));
  }
  const int nranks = argc > 1 ? std::atoi(argv[1]) : std::max(2, ngpus);
  const size_t max_bytes = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : size_t{256} << 20;
  const int iterations = argc > 3 ? std::atoi(argv[3]) : 20;
  std::vector<size_t> sizes;
  for (size_t b = 4096; b <= max_bytes; b *= 4) sizes.push_back(b);
  if (nranks < 1 || sizes.empty() || iterations < 1) {
    std::printf("usage: %s [ranks >= 1] [max_bytes >= 4096] [iterations >= 1]\n", argv[0]);
    return 1;
  }
  if (Check(nranks, ngpus, sizes, iterations)) {
    std::printf("RESULT: PASS\n");
    return 0;
  }
  if (nranks > ngpus) {
    std::printf("%d ranks on %d GPU%s failed (NCCL wants one rank per GPU); again with %d\n",
                nranks, ngpus, ngpus == 1 ? "" : "s", ngpus);
    if (Check(ngpus, ngpus, sizes, iterations)) {
      std::printf("RESULT: PASS with %d rank%s (the shared-GPU run failed, above)\n", ngpus,
                  ngpus == 1 ? "" : "s");
      return 0;
    }
  }
  std::printf("RESULT: FAIL\n");
  return 1;
}
