#include "runtime/device_probe.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <sched.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/file_util.h"
#include "common/logging.h"

namespace shoal::runtime {
namespace {

template <typename Fn>
Fn BlasSymbol(const char* name) {
  return reinterpret_cast<Fn>(::dlsym(RTLD_DEFAULT, name));
}

std::string CpuModel() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon != std::string::npos) return line.substr(colon + 2);
    }
  }
  return "unknown-cpu";
}

std::string CacheDir() {
  if (const char* d = std::getenv("SHOAL_CACHE_DIR"); d != nullptr && *d) return d;
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x != nullptr && *x) {
    return absl::StrCat(x, "/shoal");
  }
  const char* home = std::getenv("HOME");
  return absl::StrCat(home ? home : "/tmp", "/.cache/shoal");
}

}  // namespace

int AvailableCores() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

ThreadPlan ChooseThreadPlan(const ModelConfig& model, int omp_threads, int blas_threads) {
  (void)model;
  const int cores = AvailableCores();
  ThreadPlan plan;
  // Measured on 2 cores (bench/train_vs_pytorch.sh): the GEMMs are 75-90% of a step, so BLAS gets
  // every core; shoal's fused kernels on one thread cost less than a second pool contending with
  // OpenBLAS's spinning workers (tiny: +9% tokens/s over both pools on all cores; small: equal).
  plan.omp_threads = omp_threads > 0 ? omp_threads : 1;
  plan.blas_threads = blas_threads > 0 ? blas_threads : cores;
  plan.reason = (omp_threads > 0 || blas_threads > 0)
                    ? "from the config"
                    : absl::StrCat("BLAS on all ", cores, " cores, fused kernels on 1");
  return plan;
}

absl::Status ApplyThreadPlan(const ThreadPlan& plan) {
  at::set_num_threads(plan.omp_threads);
  using SetThreads = void (*)(int);
  if (auto set = BlasSymbol<SetThreads>("openblas_set_num_threads")) {
    set(plan.blas_threads);
    return absl::OkStatus();
  }
  if (plan.blas_threads != 1) {
    return absl::FailedPreconditionError(
        "cannot set BLAS threads: LibTorch is not using OpenBLAS (install libopenblas0-pthread)");
  }
  return absl::OkStatus();
}

std::string DescribeBlas() {
  using GetConfig = char* (*)();
  if (auto cfg = BlasSymbol<GetConfig>("openblas_get_config")) {
    return absl::StrCat("OpenBLAS (", cfg(), ")");
  }
  return "reference BLAS: matmuls ~20x slower; install libopenblas0-pthread";
}

bool NeedsEnvironmentReexec() {
  if (std::getenv("OMP_WAIT_POLICY") != nullptr) return false;
  ::setenv("OMP_WAIT_POLICY", "passive", 1);
  return true;
}

absl::StatusOr<double> PeakGflops(bool refresh) {
  // The machine's peak, even when this process is bound to fewer cores (mpirun binds each rank
  // to one): measured on the cores we may use, scaled to every online core.
  const int cores = AvailableCores();
  const int online = std::max<int>(cores, static_cast<int>(::sysconf(_SC_NPROCESSORS_ONLN)));
  char host[256] = {0};
  ::gethostname(host, sizeof(host) - 1);
  const std::string key = absl::StrCat(host, "|", CpuModel(), "|", online, " cores");
  const std::string dir = CacheDir();
  const std::string path = dir + "/peak_gflops.json";
  nlohmann::json cache = nlohmann::json::object();
  if (auto text = ReadFileToString(path); text.ok()) {
    cache = nlohmann::json::parse(*text, nullptr, /*allow_exceptions=*/false);
    if (!cache.is_object()) cache = nlohmann::json::object();  // unreadable cache: re-measure
    if (!refresh && cache.contains(key) && cache[key].is_number() && cache[key].get<double>() > 0) {
      return cache[key].get<double>();
    }
  }
  // Measure with every core on BLAS, then restore the caller's pools.
  const int saved_omp = at::get_num_threads();
  using SetThreads = void (*)(int);
  using GetThreads = int (*)();
  auto set_blas = BlasSymbol<SetThreads>("openblas_set_num_threads");
  auto get_blas = BlasSymbol<GetThreads>("openblas_get_num_threads");
  const int saved_blas = get_blas ? get_blas() : 1;
  if (set_blas) set_blas(cores);
  constexpr int64_t n = 2048;
  at::Tensor a = at::randn({n, n}), b = at::randn({n, n}), c = at::empty({n, n});
  at::mm_out(c, a, b);  // warm-up: thread start, page faults
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    at::mm_out(c, a, b);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 2.0 * n * n * n / s / 1e9);
  }
  if (set_blas) set_blas(saved_blas);
  at::set_num_threads(saved_omp);
  best *= static_cast<double>(online) / cores;
  cache[key] = best;
  if (MakeDirs(dir).ok()) {
    absl::Status s = WriteFileAtomic(path, cache.dump(2));
    if (!s.ok()) SHOAL_LOG(Warning) << "could not cache the GEMM peak: " << s.message();
  }
  return best;
}

}  // namespace shoal::runtime
