// What this machine can do, measured rather than assumed: the BLAS library LibTorch calls, the
// thread pools (LibTorch's OpenMP pool and OpenBLAS's own pthread pool, which oversubscribe a
// small machine when both run wide), and the fp32 GEMM peak used as the MFU denominator.
// Functions here change process-wide settings; call them from one thread at start-up.
#ifndef SHOAL_RUNTIME_DEVICE_PROBE_H_
#define SHOAL_RUNTIME_DEVICE_PROBE_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "runtime/config.h"

namespace shoal::runtime {

struct ThreadPlan {
  int omp_threads = 1;   // LibTorch intra-op (OpenMP) threads: shoal's kernels, copies, adds
  int blas_threads = 1;  // OpenBLAS threads: every matmul
  std::string reason;    // why, for the log
};

// Logical CPUs this process may run on (sched_getaffinity).
int AvailableCores();

// The plan for a model: explicit values win (0 = choose). By default BLAS gets every core and
// the LibTorch pool (shoal's fused kernels) one thread: the matmuls dominate a step, and one busy
// pool never fights the other's spinning workers. `ranks_on_host` ranks share the cores: BLAS
// gets its share of them (at least one), so ranks do not oversubscribe the machine. Where the
// config leaves BLAS threads to shoal, OPENBLAS_NUM_THREADS (an integer in [1, 4096]) wins over
// that choice; another value is ignored and the plan's reason says so.
ThreadPlan ChooseThreadPlan(const ModelConfig& model, int omp_threads, int blas_threads,
                            int ranks_on_host = 1);

// Sets both pools. kFailedPrecondition if the BLAS thread count cannot be set (not OpenBLAS).
absl::Status ApplyThreadPlan(const ThreadPlan& plan);

// "OpenBLAS 0.3.21 ... (pthread)" or "reference BLAS (slow!)" from the loaded library.
std::string DescribeBlas();

// Sets OMP_WAIT_POLICY=passive unless the user chose a policy, so that when a config asks for
// several OpenMP threads their idle workers sleep instead of spinning against OpenBLAS's. libgomp
// reads it when it loads, before main, so launch/ calls this first thing and re-executes the
// binary once when it returns true.
bool NeedsEnvironmentReexec();

// Model name of the CPU from /proc/cpuinfo ("unknown-cpu" when it has none).
std::string CpuModel();

// The folder for per-machine caches: $SHOAL_CACHE_DIR, else $XDG_CACHE_HOME/shoal, else
// ~/.cache/shoal. Not created here.
std::string CacheDir();

enum class GemmType { kFloat32, kBFloat16 };

// Best rate in GFLOP/s of square matmuls of `type` with every available core on BLAS (both
// pools are restored afterwards). The size starts at `min_n` and doubles up to `max_n` while
// one product takes under a tenth of `seconds`; products at the final size then repeat until
// `seconds` is spent, at least `min_reps` times, after one warm-up. Returns 0 when this build
// has no matmul for `type`.
double MeasureGemmGflops(GemmType type, int64_t min_n, int64_t max_n, double seconds,
                         int min_reps);

// GEMM peak of this machine in GFLOP/s for `type` (fp32 unless told) with every core on BLAS
// (best of several 2048^3 matmuls; a process bound to fewer cores measures on those and scales
// to all online cores): the MFU denominator of a run computing in that type. A type this build
// has no matmul for gives the fp32 peak. Cached per machine (host name, CPU model, core count)
// and type in $SHOAL_CACHE_DIR or ~/.cache/shoal/peak_gflops.json; `refresh` re-measures.
absl::StatusOr<double> PeakGflops(bool refresh = false, GemmType type = GemmType::kFloat32);

}  // namespace shoal::runtime

#endif  // SHOAL_RUNTIME_DEVICE_PROBE_H_
