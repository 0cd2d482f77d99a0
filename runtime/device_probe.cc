#include "runtime/device_probe.h"

#include <algorithm>
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

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/file_util.h"
#include "common/logging.h"
#include "common/status.h"

namespace shoal::runtime {
namespace {

template <typename Fn>
Fn BlasSymbol(const char* name) {
  return reinterpret_cast<Fn>(::dlsym(RTLD_DEFAULT, name));
}

// Sets OpenBLAS to `threads` (when it is the BLAS) for the object's life, and restores both pools.
class ScopedBlasThreads {
 public:
  explicit ScopedBlasThreads(int threads)
      : saved_omp_(at::get_num_threads()),
        set_(BlasSymbol<SetThreads>("openblas_set_num_threads")),
        get_(BlasSymbol<GetThreads>("openblas_get_num_threads")),
        saved_blas_(get_ ? get_() : 1) {
    if (set_) set_(threads);
  }
  ~ScopedBlasThreads() {
    if (set_) set_(saved_blas_);
    at::set_num_threads(saved_omp_);
  }
  ScopedBlasThreads(const ScopedBlasThreads&) = delete;
  ScopedBlasThreads& operator=(const ScopedBlasThreads&) = delete;

 private:
  using SetThreads = void (*)(int);
  using GetThreads = int (*)();
  int saved_omp_;
  SetThreads set_;
  GetThreads get_;
  int saved_blas_;
};

}  // namespace

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

int AvailableCores() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

ThreadPlan ChooseThreadPlan(const ModelConfig& model, int omp_threads, int blas_threads,
                            int ranks_on_host) {
  (void)model;
  // Ranks that are not pinned each see every core: split them.
  const int cores = std::max(1, AvailableCores() / std::max(1, ranks_on_host));
  ThreadPlan plan;
  // Measured on 2 cores (bench/train_vs_pytorch.sh): the GEMMs are 75-90% of a step, so BLAS gets
  // every core; shoal's fused kernels on one thread cost less than a second pool contending with
  // OpenBLAS's spinning workers (tiny: +9% tokens/s over both pools on all cores; small: equal).
  plan.omp_threads = omp_threads > 0 ? omp_threads : 1;
  plan.blas_threads = blas_threads > 0 ? blas_threads : cores;
  plan.reason = (omp_threads > 0 || blas_threads > 0)
                    ? "from the config"
                    : ranks_on_host > 1
                          ? absl::StrCat("BLAS on ", cores, " of the cores shared by ",
                                         ranks_on_host, " ranks, fused kernels on 1")
                          : absl::StrCat("BLAS on all ", cores, " cores, fused kernels on 1");
  // OpenBLAS's own variable, where the config leaves BLAS to shoal: the user (or a launcher that
  // put several processes on the host) chose it, and setting the pool would silently undo it.
  if (blas_threads <= 0) {
    if (const char* env = std::getenv("OPENBLAS_NUM_THREADS"); env != nullptr && *env != '\0') {
      int n = 0;
      if (absl::SimpleAtoi(env, &n) && n >= 1 && n <= 4096) {
        plan.blas_threads = n;
        absl::StrAppend(&plan.reason, "; BLAS on ", n, " from OPENBLAS_NUM_THREADS");
      } else {
        absl::StrAppend(&plan.reason, "; OPENBLAS_NUM_THREADS='", env,
                        "' ignored (not an integer in [1, 4096])");
      }
    }
  }
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

double MeasureGemmGflops(GemmType type, int64_t min_n, int64_t max_n, double seconds,
                         int min_reps) {
  using Clock = std::chrono::steady_clock;
  const at::ScalarType dtype = type == GemmType::kBFloat16 ? at::kBFloat16 : at::kFloat;
  ScopedBlasThreads threads(AvailableCores());
  auto time_one = [](const at::Tensor& a, const at::Tensor& b, at::Tensor& c) {
    const auto t0 = Clock::now();
    at::mm_out(c, a, b);
    return std::chrono::duration<double>(Clock::now() - t0).count();
  };
  try {
    int64_t n = std::max<int64_t>(1, min_n);
    at::Tensor a, b, c;
    auto allocate = [&] {
      a = at::randn({n, n}).to(dtype);
      b = at::randn({n, n}).to(dtype);
      c = at::empty({n, n}, at::TensorOptions().dtype(dtype));
    };
    allocate();
    double t = time_one(a, b, c);  // warm-up: thread start, page faults
    while (n < max_n && t < seconds / 10) {
      n = std::min(max_n, 2 * n);
      allocate();
      time_one(a, b, c);
      t = time_one(a, b, c);
    }
    const double flops = 2.0 * static_cast<double>(n) * n * n;
    double best = 0, spent = 0;
    for (int rep = 0; rep < min_reps || spent < seconds; ++rep) {
      const double s = time_one(a, b, c);
      spent += s;
      best = std::max(best, flops / s / 1e9);
    }
    return best;
  } catch (const c10::Error&) {
    return 0;  // no matmul kernel for this type in this build
  }
}

absl::StatusOr<double> PeakGflops(bool refresh, GemmType type) {
  // The machine's peak, even when this process is bound to fewer cores (mpirun binds each rank
  // to one): measured on the cores we may use, scaled to every online core.
  const int cores = AvailableCores();
  const int online = std::max<int>(cores, static_cast<int>(::sysconf(_SC_NPROCESSORS_ONLN)));
  char host[256] = {0};
  ::gethostname(host, sizeof(host) - 1);
  // fp32's key is the one caches written before the type was part of it use.
  const std::string key = absl::StrCat(host, "|", CpuModel(), "|", online, " cores",
                                       type == GemmType::kFloat32 ? "" : "|bf16");
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
  // Best of five 2048^3 products: large enough to reach the BLAS kernel's steady rate.
  double best = MeasureGemmGflops(type, 2048, 2048, 0.0, 5) * online / cores;
  if (best <= 0 && type != GemmType::kFloat32) {
    // No matmul of that type in this build: fp32's peak, cached under both keys.
    SHOAL_ASSIGN_OR_RETURN(best, PeakGflops(refresh, GemmType::kFloat32));
    cache = nlohmann::json::parse(ReadFileToString(path).value_or("{}"), nullptr, false);
    if (!cache.is_object()) cache = nlohmann::json::object();
  }
  cache[key] = best;
  if (MakeDirs(dir).ok()) {
    absl::Status s = WriteFileAtomic(path, cache.dump(2));
    if (!s.ok()) SHOAL_LOG(Warning) << "could not cache the GEMM peak: " << s.message();
  }
  return best;
}

}  // namespace shoal::runtime
