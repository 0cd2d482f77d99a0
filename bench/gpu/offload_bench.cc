// offload_bench: the device tier (memory/device_cache.h) on a real GPU. It trains one model twice
// in one run, from the same seed and data:
//   resident   the device budget holds every state chunk: after the first step nothing moves;
//   offloaded  the budget is the state bytes / --over: chunks are paged between pinned host homes
//              and the device slots, prefetched ahead of use and evicted by farthest next use.
// and checks that the two end bit-identical (every step's loss, and the final weights and AdamW
// moments), then prints step times, tokens/s, the cache's traffic per step against the traffic
// the eviction policy predicts for the recorded trace, and the host<->device bandwidth that
// bounds it, ending with one JSON line.
//
// The model: L layers y_{i+1} = relu(y_i W_i), y_0 = X (T x d), W_i (d x d), fp32, with
// loss = mean((y_L - Y*)^2) / 2 against a fixed random target, one micro-batch per step, AdamW.
// Model states are chunks of d*d floats: P_i (W_i), M_i and V_i (its moments), homes in pinned
// host memory. The gradient of W_i goes into one device scratch buffer, and AdamW for layer i runs
// as soon as layer i's backward has produced it (the optimizer overlapped with backward), so one
// step's accesses are P_0 .. P_{L-1}, then P_i, M_i, V_i for i = L-1 .. 0. Activations (every
// layer's output, kept for the backward) and gradient buffers are device memory outside the
// chunks and are reported separately.
//
// --check runs the same code at d=64, L=3, T=32 against a plain CPU implementation in double
// (forward, backward and AdamW; its backward itself checked by finite differences first) and
// exits non-zero on a relative difference above 1e-4: the bench's own proof that what it times
// computes the right thing.
//
// Exit status: 0 pass; 1 a mismatch or a CUDA/cuBLAS/cache error; 2 bad flags; 77 no usable GPU.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bench/gpu/offload_kernels.h"
#include "common/status.h"
#include "memory/adamw_math.h"
#include "memory/cuda_backend.h"
#include "memory/device_adamw.h"
#include "memory/device_cache.h"
#include "memory/eviction.h"

namespace shoal::bench {
namespace {

using memory::DeviceCacheOptions;
using memory::DeviceCacheStats;
using memory::DeviceChunkCache;

constexpr int kExitMismatch = 1;
constexpr int kExitBadFlags = 2;
constexpr int kExitNoGpu = 77;

// AdamW as torch.optim.AdamW's defaults. Adam moves every weight by about the learning rate, so
// a layer's output moves by about lr * d against weights of scale 1/sqrt(d): the rate falls as
// 1/d (1e-3 at d = 64) so that wide stacks train instead of blowing up or dying in one step.
double LearningRate(int64_t d) { return 1e-3 * 64.0 / static_cast<double>(d); }
constexpr double kBeta1 = 0.9;
constexpr double kBeta2 = 0.999;
constexpr double kEps = 1e-8;
constexpr double kWeightDecay = 0.01;
constexpr uint64_t kSeed = 20240607;

// --check's sizes: small enough for a CPU reference in double, large enough that every GEMM has
// more than one tile and the offloaded run has to evict (3 slots for 9 chunks).
constexpr int64_t kCheckD = 64;
constexpr int kCheckLayers = 3;
constexpr int64_t kCheckTokens = 32;
constexpr int kCheckSteps = 4;
constexpr double kCheckTolerance = 1e-4;

// ---------------------------------------------------------------------------------------------
// Flags.

struct Flags {
  int64_t d = 4096;
  int64_t layers = 16;
  int64_t tokens = 16384;
  int64_t steps = 6;  // the first is the untimed warm-up that records the trace
  double over = 4.0;
  int64_t prefetch = 4;
  int64_t tf32 = 1;
  bool check = false;
  // Only the offloaded configuration, for models whose states do not fit the device at all
  // (nothing to compare with: no bit-identity check, no throughput ratio).
  bool offloaded_only = false;
  std::string json;
};

constexpr char kUsage[] =
    "usage: offload_bench [--d N] [--layers N] [--tokens N] [--steps N] [--over X]\n"
    "                     [--prefetch N] [--tf32 0|1] [--check] [--offloaded-only]\n"
    "                     [--json FILE]\n"
    "  --d        model width: each state chunk is d*d floats (4096)\n"
    "  --layers   relu layers (16)\n"
    "  --tokens   tokens per step, one micro-batch (16384)\n"
    "  --steps    steps per configuration; the first is the warm-up, the rest are timed (6)\n"
    "  --over     offloaded config: model states / device budget (4)\n"
    "  --prefetch chunks prefetched ahead of each access (4)\n"
    "  --tf32     1: cuBLAS TF32 tensor-core math, 0: full fp32 (1); both configs use it\n"
    "  --check    check against a CPU double reference at d=64, L=3, T=32, then exit\n"
    "  --offloaded-only  run only the offloaded config (states may exceed the device memory)\n"
    "  --json     also write the final JSON line to FILE\n";

bool ParseInt(const std::string& text, int64_t lo, int64_t hi, int64_t* out) {
  if (text.empty()) return false;
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  if (errno != 0 || *end != '\0' || v < lo || v > hi) return false;
  *out = v;
  return true;
}

bool ParseDouble(const std::string& text, double lo, double hi, double* out) {
  if (text.empty()) return false;
  errno = 0;
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  if (errno != 0 || *end != '\0' || !std::isfinite(v) || v < lo || v > hi) return false;
  *out = v;
  return true;
}

// Returns the flags, or an error naming the flag (the caller prints it and exits 2).
absl::StatusOr<Flags> ParseFlags(int argc, char** argv) {
  Flags f;
  struct IntFlag {
    const char* name;
    int64_t* value;
    int64_t lo, hi;
  };
  const IntFlag int_flags[] = {
      {"--d", &f.d, 1, 32768},
      {"--layers", &f.layers, 1, 4096},
      // The token count is a cuBLAS dimension (int) and T*d floats must fit a cudaMalloc.
      {"--tokens", &f.tokens, 1, int64_t{1} << 24},
      {"--steps", &f.steps, 2, 100000},
      {"--prefetch", &f.prefetch, 0, 1024},
      {"--tf32", &f.tf32, 0, 1},
  };
  for (int a = 1; a < argc; ++a) {
    std::string arg = argv[a];
    if (arg == "--help" || arg == "-h") return absl::CancelledError(kUsage);
    if (arg == "--check") {
      f.check = true;
      continue;
    }
    if (arg == "--offloaded-only") {
      f.offloaded_only = true;
      continue;
    }
    std::string name = arg, value;
    bool have_value = false;
    if (const size_t eq = arg.find('='); arg.rfind("--", 0) == 0 && eq != std::string::npos) {
      name = arg.substr(0, eq);
      value = arg.substr(eq + 1);
      have_value = true;
    }
    auto take_value = [&]() -> absl::Status {
      if (have_value) return absl::OkStatus();
      if (a + 1 >= argc) return absl::InvalidArgumentError(absl::StrCat(name, ": needs a value"));
      value = argv[++a];
      return absl::OkStatus();
    };
    bool known = false;
    for (const IntFlag& flag : int_flags) {
      if (name != flag.name) continue;
      known = true;
      SHOAL_RETURN_IF_ERROR(take_value());
      if (!ParseInt(value, flag.lo, flag.hi, flag.value)) {
        return absl::InvalidArgumentError(absl::StrCat(name, ": expected an integer in [",
                                                       flag.lo, ", ", flag.hi, "], got '",
                                                       value, "'"));
      }
    }
    if (known) continue;
    if (name == "--over") {
      SHOAL_RETURN_IF_ERROR(take_value());
      if (!ParseDouble(value, 1.0, 1e6, &f.over)) {
        return absl::InvalidArgumentError(
            absl::StrCat("--over: expected a number >= 1 (states / device budget), got '", value,
                         "'"));
      }
    } else if (name == "--json") {
      SHOAL_RETURN_IF_ERROR(take_value());
      if (value.empty()) return absl::InvalidArgumentError("--json: needs a file name");
      f.json = value;
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag '", arg, "'"));
    }
  }
  // Chunk c's slot starts c * 4d^2 bytes into the cache's allocation: a multiple of 8 for d keeps
  // every slot 256-byte aligned like the cudaMalloc'd buffers, so cuBLAS picks the same kernels
  // for every placement of a chunk, and the two configurations can agree to the bit.
  if (f.d % 8 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--d: must be a multiple of 8 (aligned chunk slots), got ", f.d));
  }
  return f;
}

// ---------------------------------------------------------------------------------------------
// Deterministic data: element i of stream s is a hash of (seed, s, i), so any thread fills any
// range and both configurations (and the CPU reference) see the same numbers.

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Uniform in [-1, 1), exactly representable (24 random bits).
float UniformAt(uint64_t stream, uint64_t i) {
  const uint64_t h = SplitMix64(SplitMix64(kSeed ^ (stream * 0xd1342543de82ef95ULL)) + i);
  return static_cast<float>(static_cast<int64_t>(h >> 40) - (int64_t{1} << 23)) /
         static_cast<float>(int64_t{1} << 23);
}

// out[i] = offset + scale * UniformAt(stream, i), on all cores (the pinned homes of the default
// model are 3 GiB per configuration).
void FillUniform(float* out, int64_t n, uint64_t stream, float scale, float offset) {
  const int64_t workers = std::clamp<int64_t>(std::thread::hardware_concurrency(), 1, 32);
  const int64_t per = (n + workers - 1) / workers;
  std::vector<std::thread> threads;
  for (int64_t w = 0; w < workers; ++w) {
    const int64_t begin = w * per, end = std::min(n, begin + per);
    if (begin >= end) break;
    threads.emplace_back([=] {
      for (int64_t i = begin; i < end; ++i) out[i] = offset + scale * UniformAt(stream, i);
    });
  }
  for (std::thread& t : threads) t.join();
}

// Streams of the model's data: X, the target, and layer i's initial weights.
constexpr uint64_t kStreamInput = 1;
constexpr uint64_t kStreamTarget = 2;
uint64_t WeightStream(int64_t layer) { return 100 + static_cast<uint64_t>(layer); }

// He-uniform: var(W) = 2/d keeps the relu stack's activations at a steady scale.
float WeightScale(int64_t d) { return static_cast<float>(std::sqrt(6.0 / static_cast<double>(d))); }
void FillInput(float* x, int64_t n) { FillUniform(x, n, kStreamInput, 1.0f, 0.0f); }
void FillTarget(float* y, int64_t n) { FillUniform(y, n, kStreamTarget, 0.5f, 0.5f); }  // [0, 1)
void FillWeights(float* w, int64_t d, int64_t layer) {
  FillUniform(w, d * d, WeightStream(layer), WeightScale(d), 0.0f);
}

// ---------------------------------------------------------------------------------------------
// The CPU reference in double, row-major: y (T x d), w (d x d).

struct Reference {
  int64_t d, layers, tokens;
  std::vector<double> x, target;
  std::vector<std::vector<double>> w, m, v;
};

Reference MakeReference(int64_t d, int64_t layers, int64_t tokens) {
  Reference r{d, layers, tokens, {}, {}, {}, {}, {}};
  std::vector<float> buf(tokens * d);
  FillInput(buf.data(), tokens * d);
  r.x.assign(buf.begin(), buf.end());
  FillTarget(buf.data(), tokens * d);
  r.target.assign(buf.begin(), buf.end());
  std::vector<float> wbuf(d * d);
  for (int64_t i = 0; i < layers; ++i) {
    FillWeights(wbuf.data(), d, i);
    r.w.emplace_back(wbuf.begin(), wbuf.end());
    r.m.emplace_back(d * d, 0.0);
    r.v.emplace_back(d * d, 0.0);
  }
  return r;
}

// acts[0] = x, acts[i+1] = relu(acts[i] w[i]); returns the loss.
double ReferenceForward(const Reference& r, std::vector<std::vector<double>>* acts) {
  const int64_t d = r.d, T = r.tokens;
  acts->assign(r.layers + 1, {});
  (*acts)[0] = r.x;
  for (int64_t i = 0; i < r.layers; ++i) {
    const std::vector<double>& in = (*acts)[i];
    std::vector<double>& out = (*acts)[i + 1];
    out.assign(T * d, 0.0);
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t k = 0; k < d; ++k) {
        const double a = in[t * d + k];
        for (int64_t c = 0; c < d; ++c) out[t * d + c] += a * r.w[i][k * d + c];
      }
    }
    for (double& z : out) z = z > 0 ? z : 0;
  }
  double sum = 0;
  const std::vector<double>& y = (*acts)[r.layers];
  for (int64_t e = 0; e < T * d; ++e) sum += (y[e] - r.target[e]) * (y[e] - r.target[e]);
  return sum / (2.0 * static_cast<double>(T * d));
}

// dW_i for every layer, from the activations of ReferenceForward.
std::vector<std::vector<double>> ReferenceBackward(const Reference& r,
                                                   const std::vector<std::vector<double>>& acts) {
  const int64_t d = r.d, T = r.tokens, n = T * d;
  std::vector<std::vector<double>> dw(r.layers);
  std::vector<double> g(n);
  for (int64_t e = 0; e < n; ++e) g[e] = (acts[r.layers][e] - r.target[e]) / static_cast<double>(n);
  for (int64_t i = r.layers - 1; i >= 0; --i) {
    for (int64_t e = 0; e < n; ++e) {
      if (!(acts[i + 1][e] > 0)) g[e] = 0;  // dz = dy * relu'(z)
    }
    dw[i].assign(d * d, 0.0);  // dW = y_i^T dz
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t k = 0; k < d; ++k) {
        const double a = acts[i][t * d + k];
        for (int64_t c = 0; c < d; ++c) dw[i][k * d + c] += a * g[t * d + c];
      }
    }
    if (i == 0) break;
    std::vector<double> prev(n, 0.0);  // dy_i = dz W_i^T
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t k = 0; k < d; ++k) {
        double s = 0;
        for (int64_t c = 0; c < d; ++c) s += g[t * d + c] * r.w[i][k * d + c];
        prev[t * d + k] = s;
      }
    }
    g.swap(prev);
  }
  return dw;
}

void ReferenceAdamW(Reference* r, const std::vector<std::vector<double>>& dw, int64_t step) {
  const double bc1 = 1 - std::pow(kBeta1, static_cast<double>(step));
  const double bc2 = 1 - std::pow(kBeta2, static_cast<double>(step));
  for (int64_t i = 0; i < r->layers; ++i) {
    for (size_t e = 0; e < dw[i].size(); ++e) {
      const double g = dw[i][e];
      double& p = r->w[i][e];
      double& m = r->m[i][e];
      double& v = r->v[i][e];
      p *= 1 - LearningRate(r->d) * kWeightDecay;
      m = kBeta1 * m + (1 - kBeta1) * g;
      v = kBeta2 * v + (1 - kBeta2) * g * g;
      p -= LearningRate(r->d) / bc1 * m / (std::sqrt(v) / std::sqrt(bc2) + kEps);
    }
  }
}

// The reference's backward against central differences of its forward, at a few weights per
// layer: if this fails, the reference itself is wrong and the GPU comparison would mean nothing.
bool CheckReferenceGradients(int64_t d, int64_t layers, int64_t tokens) {
  Reference r = MakeReference(d, layers, tokens);
  std::vector<std::vector<double>> acts;
  ReferenceForward(r, &acts);
  const std::vector<std::vector<double>> dw = ReferenceBackward(r, acts);
  constexpr double kH = 1e-5;
  constexpr int kProbes = 12;
  double worst = 0;
  bool ok = true;
  for (int64_t i = 0; i < layers; ++i) {
    double scale = 0;
    for (double g : dw[i]) scale = std::max(scale, std::abs(g));
    for (int p = 0; p < kProbes; ++p) {
      const int64_t e = static_cast<int64_t>(SplitMix64(977 * i + p) % (d * d));
      const double saved = r.w[i][e];
      r.w[i][e] = saved + kH;
      const double up = ReferenceForward(r, &acts);
      r.w[i][e] = saved - kH;
      const double down = ReferenceForward(r, &acts);
      r.w[i][e] = saved;
      const double fd = (up - down) / (2 * kH);
      const double err = std::abs(fd - dw[i][e]) / std::max(scale, 1e-300);
      worst = std::max(worst, err);
      if (err > 1e-5) {
        std::printf("check: reference gradient of layer %" PRId64 " element %" PRId64
                    ": backward %.10e, finite difference %.10e\n",
                    i, e, dw[i][e], fd);
        ok = false;
      }
    }
  }
  std::printf("check: CPU reference backward vs central differences (%d weights per layer): "
              "worst error %.2e of the layer's largest gradient: %s\n",
              kProbes, worst, ok ? "ok" : "MISMATCH");
  return ok;
}

// ---------------------------------------------------------------------------------------------
// CUDA and cuBLAS plumbing.

absl::Status Cuda(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("CUDA: ", what, ": ", cudaGetErrorString(e)));
}
absl::Status Cublas(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("cuBLAS: ", what, ": ", cublasGetStatusString(s)));
}

// Frees what the bench allocated on the device, in any exit path.
class DeviceBuffers {
 public:
  ~DeviceBuffers() {
    for (void* p : buffers_) (void)cudaFree(p);
  }
  template <typename T>
  absl::StatusOr<T*> Allocate(int64_t count, const char* what) {
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, static_cast<size_t>(count) * sizeof(T));
    if (e != cudaSuccess) {
      return absl::ResourceExhaustedError(absl::StrCat("CUDA: cudaMalloc of ", count * sizeof(T),
                                                       " bytes for ", what, ": ",
                                                       cudaGetErrorString(e)));
    }
    buffers_.push_back(p);
    return static_cast<T*>(p);
  }

 private:
  std::vector<void*> buffers_;
};

class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  ~PinnedBuffer() { memory::FreePinnedHost(p_); }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  absl::Status Allocate(int64_t bytes) {
    SHOAL_ASSIGN_OR_RETURN(p_, memory::AllocatePinnedHost(bytes));
    bytes_ = bytes;
    return absl::OkStatus();
  }
  char* data() const { return static_cast<char*>(p_); }
  int64_t bytes() const { return bytes_; }

 private:
  void* p_ = nullptr;
  int64_t bytes_ = 0;
};

// The model's sizes and the chunk ids of its states.
struct Shape {
  int64_t d, layers, tokens;
  int64_t chunk_floats() const { return d * d; }
  int64_t chunk_bytes() const { return d * d * static_cast<int64_t>(sizeof(float)); }
  int num_chunks() const { return static_cast<int>(3 * layers); }
  int64_t state_bytes() const { return num_chunks() * chunk_bytes(); }
  int P(int64_t i) const { return static_cast<int>(i); }
  int M(int64_t i) const { return static_cast<int>(layers + i); }
  int V(int64_t i) const { return static_cast<int>(2 * layers + i); }
  int64_t act_floats() const { return tokens * d; }
  // Kept for the backward: the input and every layer's output.
  int64_t activation_bytes() const {
    return (layers + 1) * act_floats() * static_cast<int64_t>(sizeof(float));
  }
  // Everything on the device outside the chunks: activations, the target, two gradient buffers
  // (dy in, dy out), the dW scratch and the loss's partial sums.
  int64_t non_chunk_bytes() const {
    return activation_bytes() + 3 * act_floats() * static_cast<int64_t>(sizeof(float)) +
           chunk_bytes() + (kLossBlocks + 1) * static_cast<int64_t>(sizeof(double));
  }
  // Forward y W, backward dW = y^T dz and dy = dz W^T (not for layer 0): 2 FLOP per MAC.
  double flops_per_step() const {
    return 2.0 * tokens * d * d * (3.0 * layers - 1.0);
  }
};

// The compute side, shared by both configurations: the stream, cuBLAS, and the non-chunk buffers.
struct Compute {
  Shape shape;
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  std::vector<float*> acts;  // acts[0] = X, acts[i+1] = layer i's output; T x d each
  float* target = nullptr;   // T x d
  float* grad[2] = {nullptr, nullptr};  // dy ping-pong, T x d
  float* dw = nullptr;       // d x d: the one gradient scratch
  double* partials = nullptr;
  double* loss_device = nullptr;
  PinnedBuffer loss_host;
  DeviceBuffers buffers;

  ~Compute() {
    if (cublas != nullptr) (void)cublasDestroy(cublas);
    if (stream != nullptr) (void)cudaStreamDestroy(stream);
  }
};

absl::StatusOr<std::unique_ptr<Compute>> MakeCompute(const Shape& shape, bool tf32) {
  auto c = std::make_unique<Compute>();
  c->shape = shape;
  // Non-blocking: no implicit ordering with the legacy default stream; the cache's copy stream
  // is ordered against this one only through its events.
  SHOAL_RETURN_IF_ERROR(Cuda(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking),
                             "cudaStreamCreateWithFlags"));
  SHOAL_RETURN_IF_ERROR(Cublas(cublasCreate(&c->cublas), "cublasCreate"));
  SHOAL_RETURN_IF_ERROR(Cublas(cublasSetStream(c->cublas, c->stream), "cublasSetStream"));
  SHOAL_RETURN_IF_ERROR(Cublas(
      cublasSetMathMode(c->cublas, tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH),
      "cublasSetMathMode"));
  const int64_t n = shape.act_floats();
  for (int64_t i = 0; i <= shape.layers; ++i) {
    SHOAL_ASSIGN_OR_RETURN(float* a, c->buffers.Allocate<float>(n, "an activation"));
    c->acts.push_back(a);
  }
  SHOAL_ASSIGN_OR_RETURN(c->target, c->buffers.Allocate<float>(n, "the target"));
  SHOAL_ASSIGN_OR_RETURN(c->grad[0], c->buffers.Allocate<float>(n, "a gradient buffer"));
  SHOAL_ASSIGN_OR_RETURN(c->grad[1], c->buffers.Allocate<float>(n, "a gradient buffer"));
  SHOAL_ASSIGN_OR_RETURN(c->dw, c->buffers.Allocate<float>(shape.chunk_floats(), "dW"));
  SHOAL_ASSIGN_OR_RETURN(c->partials, c->buffers.Allocate<double>(kLossBlocks, "loss partials"));
  SHOAL_ASSIGN_OR_RETURN(c->loss_device, c->buffers.Allocate<double>(1, "the loss"));
  SHOAL_RETURN_IF_ERROR(c->loss_host.Allocate(sizeof(double)));

  // X and the target: made on the host once, through a pinned staging buffer.
  PinnedBuffer staging;
  SHOAL_RETURN_IF_ERROR(staging.Allocate(n * static_cast<int64_t>(sizeof(float))));
  float* host = reinterpret_cast<float*>(staging.data());
  FillInput(host, n);
  SHOAL_RETURN_IF_ERROR(Cuda(cudaMemcpy(c->acts[0], host, n * sizeof(float),
                                        cudaMemcpyHostToDevice), "copy X"));
  FillTarget(host, n);
  SHOAL_RETURN_IF_ERROR(Cuda(cudaMemcpy(c->target, host, n * sizeof(float),
                                        cudaMemcpyHostToDevice), "copy the target"));
  return c;
}

// cuBLAS is column-major; our matrices are row-major, and a row-major (r x c) buffer is the
// column-major (c x r) matrix, its transpose. So each row-major product C = A B is issued as
// C^T = B^T A^T with the operands swapped, all leading dimensions d.

// One column-major product C (m x n) = op(A) op(B), with the inner dimension k; every leading
// dimension is d.
absl::Status Gemm(const Compute& c, cublasOperation_t op_a, cublasOperation_t op_b, int64_t m,
                  int64_t n, int64_t k, const float* a, const float* b, float* out,
                  const char* what) {
  const float one = 1.0f, zero = 0.0f;
  const int d = static_cast<int>(c.shape.d);
  return Cublas(cublasSgemm(c.cublas, op_a, op_b, static_cast<int>(m), static_cast<int>(n),
                            static_cast<int>(k), &one, a, d, b, d, &zero, out, d),
                what);
}

// z (T x d) = y (T x d) . w (d x d)
absl::Status GemmForward(const Compute& c, const float* y, const float* w, float* z) {
  const int64_t d = c.shape.d, T = c.shape.tokens;
  return Gemm(c, CUBLAS_OP_N, CUBLAS_OP_N, d, T, d, w, y, z, "forward y.W");
}

// dw (d x d) = y^T (d x T) . dz (T x d)   [column-major: dw^T = dz^T . y]
absl::Status GemmWeightGrad(const Compute& c, const float* y, const float* dz, float* dw) {
  const int64_t d = c.shape.d, T = c.shape.tokens;
  return Gemm(c, CUBLAS_OP_N, CUBLAS_OP_T, d, d, T, dz, y, dw, "backward dW = y^T.dz");
}

// dy (T x d) = dz (T x d) . w^T (d x d)   [column-major: dy^T = w . dz^T]
absl::Status GemmInputGrad(const Compute& c, const float* dz, const float* w, float* dy) {
  const int64_t d = c.shape.d, T = c.shape.tokens;
  return Gemm(c, CUBLAS_OP_T, CUBLAS_OP_N, d, T, d, w, dz, dy, "backward dy = dz.W^T");
}

// ---------------------------------------------------------------------------------------------
// One training step through the cache.

// The states' pinned homes: one allocation, chunk c at c * chunk_bytes.
struct Homes {
  PinnedBuffer memory;
  std::vector<void*> chunks;
};

// P_i = W_i's initial values, M_i = V_i = 0. Done before the cache exists: the cache reads homes
// only when it loads a chunk, and must never find them half written.
absl::Status MakeHomes(const Shape& s, Homes* homes) {
  SHOAL_RETURN_IF_ERROR(homes->memory.Allocate(s.state_bytes()));
  homes->chunks.clear();
  for (int c = 0; c < s.num_chunks(); ++c) {
    homes->chunks.push_back(homes->memory.data() + c * s.chunk_bytes());
  }
  for (int64_t i = 0; i < s.layers; ++i) {
    FillWeights(static_cast<float*>(homes->chunks[s.P(i)]), s.d, i);
    std::memset(homes->chunks[s.M(i)], 0, s.chunk_bytes());
    std::memset(homes->chunks[s.V(i)], 0, s.chunk_bytes());
  }
  return absl::OkStatus();
}

// Acquires through the cache, appending to `trace` while the warm-up records it.
class Accessor {
 public:
  Accessor(DeviceChunkCache* cache, std::vector<int>* trace) : cache_(cache), trace_(trace) {}
  absl::StatusOr<float*> Acquire(int chunk) {
    if (trace_ != nullptr) trace_->push_back(chunk);
    SHOAL_ASSIGN_OR_RETURN(void* p, cache_->Acquire(chunk));
    return static_cast<float*>(p);
  }
  absl::Status Release(int chunk, bool dirty) { return cache_->Release(chunk, dirty); }

 private:
  DeviceChunkCache* cache_;
  std::vector<int>* trace_;
};

// Queues one step (`step` is 1-based, for AdamW's bias correction) and waits for it; returns the
// loss of the forward (before this step's update).
absl::StatusOr<double> TrainStep(Compute& c, Accessor& chunks, int64_t step) {
  const Shape& s = c.shape;
  const int64_t n = s.act_floats();

  // Forward: acts[i+1] = relu(acts[i] W_i), each W_i read only.
  for (int64_t i = 0; i < s.layers; ++i) {
    SHOAL_ASSIGN_OR_RETURN(float* w, chunks.Acquire(s.P(i)));
    SHOAL_RETURN_IF_ERROR(GemmForward(c, c.acts[i], w, c.acts[i + 1]));
    SHOAL_RETURN_IF_ERROR(Cuda(ReluInPlace(c.acts[i + 1], n, c.stream), "relu"));
    SHOAL_RETURN_IF_ERROR(chunks.Release(s.P(i), /*dirty=*/false));
  }
  SHOAL_RETURN_IF_ERROR(Cuda(MseLossAndGrad(c.acts[s.layers], c.target, c.grad[0], n,
                                            c.partials, c.loss_device, c.stream),
                             "loss"));

  // Backward, each layer's AdamW right after its gradient: dz overwrites dy in place, dW goes to
  // the scratch, dy of the layer below to the other gradient buffer (read W_i before updating it).
  const memory::AdamWConstants k = memory::MakeAdamWConstants(
      kBeta1, kBeta2, kEps, kWeightDecay, step, LearningRate(s.d), /*grad_scale=*/1.0);
  int cur = 0;
  for (int64_t i = s.layers - 1; i >= 0; --i) {
    SHOAL_ASSIGN_OR_RETURN(float* w, chunks.Acquire(s.P(i)));
    float* dz = c.grad[cur];
    SHOAL_RETURN_IF_ERROR(Cuda(ReluBackwardInPlace(dz, c.acts[i + 1], n, c.stream), "relu'"));
    SHOAL_RETURN_IF_ERROR(GemmWeightGrad(c, c.acts[i], dz, c.dw));
    if (i > 0) SHOAL_RETURN_IF_ERROR(GemmInputGrad(c, dz, w, c.grad[1 - cur]));
    SHOAL_ASSIGN_OR_RETURN(float* m, chunks.Acquire(s.M(i)));
    SHOAL_ASSIGN_OR_RETURN(float* v, chunks.Acquire(s.V(i)));
    SHOAL_RETURN_IF_ERROR(memory::DeviceAdamW(k, c.dw, w, m, v, s.chunk_floats(), c.stream));
    SHOAL_RETURN_IF_ERROR(chunks.Release(s.P(i), /*dirty=*/true));
    SHOAL_RETURN_IF_ERROR(chunks.Release(s.M(i), /*dirty=*/true));
    SHOAL_RETURN_IF_ERROR(chunks.Release(s.V(i), /*dirty=*/true));
    cur = 1 - cur;
  }

  SHOAL_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(c.loss_host.data(), c.loss_device, sizeof(double),
                                             cudaMemcpyDeviceToHost, c.stream),
                             "copy the loss"));
  SHOAL_RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(c.stream), "end of step"));
  double loss;
  std::memcpy(&loss, c.loss_host.data(), sizeof(loss));
  return loss;
}

struct ConfigResult {
  std::string name;
  int capacity = 0;
  int64_t budget_bytes = 0;
  std::vector<double> losses;   // every step's
  std::vector<double> step_ms;  // every step's, the warm-up first
  DeviceCacheStats timed_begin, end;
  std::vector<int> trace;
  int64_t timed_steps() const { return static_cast<int64_t>(step_ms.size()) - 1; }
  double median_ms() const {
    std::vector<double> t(step_ms.begin() + 1, step_ms.end());
    std::sort(t.begin(), t.end());
    const size_t h = t.size() / 2;
    return t.size() % 2 == 1 ? t[h] : 0.5 * (t[h - 1] + t[h]);
  }
  // Per timed step, from the cache's counters across the timed steps.
  double PerStep(int64_t DeviceCacheStats::*field) const {
    return static_cast<double>(end.*field - timed_begin.*field) / timed_steps();
  }
  double loads_per_step() const {
    return PerStep(&DeviceCacheStats::demand_loads) + PerStep(&DeviceCacheStats::prefetches);
  }
};

// Trains `steps` steps with a cache of `budget_bytes` over `homes`, then flushes the cache so
// the homes hold the final states. Step 1 runs without a trace and records it; the cache is given
// it before step 2.
absl::StatusOr<ConfigResult> RunConfig(Compute& c, const std::string& name, int64_t budget_bytes,
                                       int prefetch, int64_t steps, Homes& homes) {
  ConfigResult r;
  r.name = name;
  r.budget_bytes = budget_bytes;
  DeviceCacheOptions options;
  options.chunk_bytes = c.shape.chunk_bytes();
  options.budget_bytes = budget_bytes;
  options.prefetch_depth = prefetch;
  options.homes = homes.chunks;
  SHOAL_ASSIGN_OR_RETURN(std::unique_ptr<memory::CudaDeviceBackend> backend,
                         memory::CudaDeviceBackend::Create(c.stream));
  SHOAL_ASSIGN_OR_RETURN(std::unique_ptr<DeviceChunkCache> cache,
                         DeviceChunkCache::Create(std::move(options), std::move(backend)));
  r.capacity = cache->capacity();
  std::printf("%s: device budget %.1f MiB = %d of %d chunks (%.1f MiB each), prefetch %d\n",
              name.c_str(), budget_bytes / 1048576.0, r.capacity, c.shape.num_chunks(),
              c.shape.chunk_bytes() / 1048576.0, prefetch);

  for (int64_t step = 1; step <= steps; ++step) {
    if (step == 2) {
      SHOAL_RETURN_IF_ERROR(cache->SetTrace(r.trace));
      r.timed_begin = cache->stats();
    }
    Accessor chunks(cache.get(), step == 1 ? &r.trace : nullptr);
    const auto t0 = std::chrono::steady_clock::now();
    SHOAL_ASSIGN_OR_RETURN(double loss, TrainStep(c, chunks, step));
    const auto t1 = std::chrono::steady_clock::now();
    const double ms = std::chrono::duration<double, std::milli>(t1 - t0).count();
    r.losses.push_back(loss);
    r.step_ms.push_back(ms);
    std::printf("%-9s step %3" PRId64 "/%" PRId64 "  loss %.9f  %9.2f ms%s\n", name.c_str(), step,
                steps, loss, ms, step == 1 ? "  (warm-up, records the trace)" : "");
    std::fflush(stdout);
  }
  r.end = cache->stats();
  SHOAL_RETURN_IF_ERROR(cache->Flush());
  return r;
}

// Loads per steady-state step that farthest-next-use (Belady) needs for `trace` at `capacity`
// chunks, from SimulateTrace: (loads over 1 + n iterations - loads over 1) / n, so the cold
// first iteration is not counted.
absl::StatusOr<double> PredictedLoadsPerStep(const std::vector<int>& trace, int capacity,
                                             int64_t n) {
  SHOAL_ASSIGN_OR_RETURN(memory::NextUseTable table, memory::NextUseTable::Build(trace));
  memory::FarthestNextUsePolicy policy(&table);
  memory::SimulationOptions options;
  options.capacity_chunks = capacity;
  options.iterations = 1;
  SHOAL_ASSIGN_OR_RETURN(memory::SimulationResult first,
                         memory::SimulateTrace(trace, options, policy));
  options.iterations = static_cast<int>(1 + n);
  SHOAL_ASSIGN_OR_RETURN(memory::SimulationResult all,
                         memory::SimulateTrace(trace, options, policy));
  return static_cast<double>(all.loads - first.loads) / n;
}

// Byte-compares two configurations' homes, naming the first chunk that differs.
bool SameStates(const Shape& s, const Homes& a, const Homes& b, std::string* first_difference) {
  for (int ch = 0; ch < s.num_chunks(); ++ch) {
    if (std::memcmp(a.chunks[ch], b.chunks[ch], s.chunk_bytes()) != 0) {
      const char* kind = ch < s.layers ? "P" : ch < 2 * s.layers ? "M" : "V";
      *first_difference = absl::StrCat(kind, "_", ch % s.layers);
      return false;
    }
  }
  return true;
}

bool SameLosses(const std::vector<double>& a, const std::vector<double>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0;
}

// Measures one 256 MiB pinned <-> device copy each way (after one untimed copy each way).
absl::Status MeasureBandwidth(cudaStream_t stream, double* h2d_gb_s, double* d2h_gb_s) {
  constexpr int64_t kBytes = int64_t{256} << 20;
  PinnedBuffer host;
  SHOAL_RETURN_IF_ERROR(host.Allocate(kBytes));
  std::memset(host.data(), 1, kBytes);
  DeviceBuffers buffers;
  SHOAL_ASSIGN_OR_RETURN(char* device, buffers.Allocate<char>(kBytes, "the bandwidth test"));
  cudaEvent_t start = nullptr, stop = nullptr;
  SHOAL_RETURN_IF_ERROR(Cuda(cudaEventCreate(&start), "cudaEventCreate"));
  SHOAL_RETURN_IF_ERROR(Cuda(cudaEventCreate(&stop), "cudaEventCreate"));
  auto time_copy = [&](void* dst, const void* src, cudaMemcpyKind kind) -> absl::StatusOr<double> {
    SHOAL_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(dst, src, kBytes, kind, stream), "warm-up copy"));
    SHOAL_RETURN_IF_ERROR(Cuda(cudaEventRecord(start, stream), "cudaEventRecord"));
    SHOAL_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(dst, src, kBytes, kind, stream), "timed copy"));
    SHOAL_RETURN_IF_ERROR(Cuda(cudaEventRecord(stop, stream), "cudaEventRecord"));
    SHOAL_RETURN_IF_ERROR(Cuda(cudaEventSynchronize(stop), "cudaEventSynchronize"));
    float ms = 0;
    SHOAL_RETURN_IF_ERROR(Cuda(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime"));
    return kBytes / 1e9 / (ms / 1e3);
  };
  absl::StatusOr<double> h2d = time_copy(device, host.data(), cudaMemcpyHostToDevice);
  absl::StatusOr<double> d2h =
      h2d.ok() ? time_copy(host.data(), device, cudaMemcpyDeviceToHost) : h2d;
  (void)cudaEventDestroy(start);
  (void)cudaEventDestroy(stop);
  SHOAL_RETURN_IF_ERROR(h2d.status());
  SHOAL_RETURN_IF_ERROR(d2h.status());
  *h2d_gb_s = *h2d;
  *d2h_gb_s = *d2h;
  return absl::OkStatus();
}

std::string JsonEscape(const std::string& s) {
  std::string out;
  for (char ch : s) {
    if (ch == '"' || ch == '\\') {
      out += '\\';
      out += ch;
    } else if (static_cast<unsigned char>(ch) < 0x20) {
      out += absl::StrFormat("\\u%04x", static_cast<unsigned char>(ch));
    } else {
      out += ch;
    }
  }
  return out;
}

// Prints the JSON line and writes it to `path` too when one is given.
absl::Status EmitJson(const std::string& json, const std::string& path) {
  std::printf("%s\n", json.c_str());
  std::fflush(stdout);
  if (path.empty()) return absl::OkStatus();
  FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) {
    return absl::UnavailableError(absl::StrCat("--json: cannot open ", path, ": ",
                                               std::strerror(errno)));
  }
  const bool ok = std::fprintf(f, "%s\n", json.c_str()) >= 0;
  if (std::fclose(f) != 0 || !ok) {
    return absl::UnavailableError(absl::StrCat("--json: cannot write ", path));
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// The two modes.

// Largest |a - b| over the largest |b|: one number per tensor, immune to the elements of a
// moment that sit near zero.
double RelativeError(const float* a, const std::vector<double>& b) {
  double err = 0, scale = 0;
  for (size_t e = 0; e < b.size(); ++e) {
    err = std::max(err, std::abs(static_cast<double>(a[e]) - b[e]));
    scale = std::max(scale, std::abs(b[e]));
  }
  return scale > 0 ? err / scale : err;
}

// Returns the exit status.
int RunCheck(const Flags& flags) {
  const Shape s{kCheckD, kCheckLayers, kCheckTokens};
  std::printf("check: d=%" PRId64 " layers=%" PRId64 " tokens=%" PRId64 " steps=%d, full fp32 "
              "(TF32 off), tolerance %.0e relative to each tensor's largest element\n",
              s.d, s.layers, s.tokens, kCheckSteps, kCheckTolerance);
  if (!CheckReferenceGradients(s.d, s.layers, s.tokens)) return kExitMismatch;
  if (memory::CudaDeviceCount() == 0) {
    std::printf("SKIP: no usable GPU\n");
    return kExitNoGpu;
  }
  absl::StatusOr<std::string> device = memory::CudaDeviceDescription();
  std::printf("check: device %s\n", device.ok() ? device->c_str() : "(unknown)");

  // The CPU reference's losses and final states.
  Reference ref = MakeReference(s.d, s.layers, s.tokens);
  std::vector<double> ref_losses;
  for (int64_t step = 1; step <= kCheckSteps; ++step) {
    std::vector<std::vector<double>> acts;
    ref_losses.push_back(ReferenceForward(ref, &acts));
    ReferenceAdamW(&ref, ReferenceBackward(ref, acts), step);
  }

  auto run = [&]() -> absl::StatusOr<bool> {
    SHOAL_ASSIGN_OR_RETURN(std::unique_ptr<Compute> c, MakeCompute(s, /*tf32=*/false));
    Homes resident_homes, offloaded_homes;
    SHOAL_RETURN_IF_ERROR(MakeHomes(s, &resident_homes));
    SHOAL_ASSIGN_OR_RETURN(ConfigResult resident,
                           RunConfig(*c, "resident", s.state_bytes(),
                                     static_cast<int>(flags.prefetch), kCheckSteps,
                                     resident_homes));
    SHOAL_RETURN_IF_ERROR(MakeHomes(s, &offloaded_homes));
    // Three slots: exactly the P_i, M_i, V_i the backward holds at once, so every other access
    // is a load or a prefetch.
    SHOAL_ASSIGN_OR_RETURN(ConfigResult offloaded,
                           RunConfig(*c, "offloaded", 3 * s.chunk_bytes(),
                                     static_cast<int>(flags.prefetch), kCheckSteps,
                                     offloaded_homes));
    bool ok = true;
    std::string where;
    const bool identical = SameLosses(resident.losses, offloaded.losses) &&
                           SameStates(s, resident_homes, offloaded_homes, &where);
    std::printf("check: offloaded vs resident: %s%s\n", identical ? "bit-identical" : "DIFFERENT",
                where.empty() ? "" : (" at " + where).c_str());
    ok = ok && identical;
    std::printf("check: offloaded cache: %" PRId64 " loads, %" PRId64 " evictions, %" PRId64
                " trace misses\n",
                offloaded.end.demand_loads + offloaded.end.prefetches, offloaded.end.evictions,
                offloaded.end.trace_misses);
    if (offloaded.end.evictions == 0) {
      std::printf("check: the offloaded run evicted nothing: it did not exercise paging\n");
      ok = false;
    }
    for (int64_t step = 0; step < kCheckSteps; ++step) {
      const double err = std::abs(offloaded.losses[step] - ref_losses[step]) /
                         std::max(std::abs(ref_losses[step]), 1e-300);
      std::printf("check: step %" PRId64 " loss %.9f, reference %.9f, relative error %.2e%s\n",
                  step + 1, offloaded.losses[step], ref_losses[step], err,
                  err > kCheckTolerance ? "  MISMATCH" : "");
      ok = ok && err <= kCheckTolerance;
    }
    double worst = 0;
    for (int64_t i = 0; i < s.layers; ++i) {
      const double errs[3] = {
          RelativeError(static_cast<const float*>(offloaded_homes.chunks[s.P(i)]), ref.w[i]),
          RelativeError(static_cast<const float*>(offloaded_homes.chunks[s.M(i)]), ref.m[i]),
          RelativeError(static_cast<const float*>(offloaded_homes.chunks[s.V(i)]), ref.v[i])};
      const char* names[3] = {"P", "M", "V"};
      for (int k = 0; k < 3; ++k) {
        worst = std::max(worst, errs[k]);
        if (errs[k] > kCheckTolerance) {
          std::printf("check: %s_%" PRId64 " after %d steps: relative error %.2e  MISMATCH\n",
                      names[k], i, kCheckSteps, errs[k]);
          ok = false;
        }
      }
    }
    std::printf("check: final weights and moments vs reference: worst relative error %.2e\n",
                worst);
    return ok;
  };
  absl::StatusOr<bool> ok = run();
  if (!ok.ok()) {
    std::printf("check: FAIL: %s\n", ok.status().ToString().c_str());
    return kExitMismatch;
  }
  std::printf("check: %s\n", *ok ? "PASS" : "FAIL");
  const std::string json = absl::StrFormat(
      "{\"check\": \"%s\", \"device\": \"%s\", \"d\": %d, \"layers\": %d, \"tokens_per_step\": %d}",
      *ok ? "pass" : "fail", JsonEscape(device.ok() ? *device : "unknown"), s.d, s.layers,
      s.tokens);
  if (absl::Status st = EmitJson(json, flags.json); !st.ok()) {
    std::printf("%s\n", st.ToString().c_str());
    return kExitMismatch;
  }
  return *ok ? 0 : kExitMismatch;
}

// --offloaded-only: the offloaded configuration alone, for states beyond the device's memory.
absl::Status RunOffloadedOnly(const Flags& flags, const Shape& s, const std::string& device,
                              int64_t device_total_bytes, int64_t offload_budget) {
  SHOAL_ASSIGN_OR_RETURN(std::unique_ptr<Compute> c, MakeCompute(s, flags.tf32 != 0));
  Homes homes;
  SHOAL_RETURN_IF_ERROR(MakeHomes(s, &homes));
  SHOAL_ASSIGN_OR_RETURN(ConfigResult r,
                         RunConfig(*c, "offloaded", offload_budget,
                                   static_cast<int>(flags.prefetch), flags.steps, homes));
  for (double loss : r.losses) {
    if (!std::isfinite(loss)) return absl::InternalError("a loss is not finite");
  }
  const double tps = s.tokens / (r.median_ms() / 1e3);
  std::printf("states %.1f GiB = %.2fx the device's %.1f GiB, budget %.1f GiB: %.1f ms/step, "
              "%.0f tokens/s, %.1f TFLOP/s; %.1f GiB in and %.1f GiB out per step\n",
              s.state_bytes() / 1073741824.0,
              static_cast<double>(s.state_bytes()) / device_total_bytes,
              device_total_bytes / 1073741824.0, offload_budget / 1073741824.0, r.median_ms(),
              tps, s.flops_per_step() / (r.median_ms() / 1e3) / 1e12,
              r.PerStep(&DeviceCacheStats::bytes_in) / 1073741824.0,
              r.PerStep(&DeviceCacheStats::bytes_out) / 1073741824.0);
  const std::string json = absl::StrFormat(
      "{\"mode\": \"offloaded_only\", \"device\": \"%s\", \"d\": %d, \"layers\": %d, "
      "\"tokens_per_step\": %d, \"params\": %d, \"state_bytes\": %d, "
      "\"device_memory_bytes\": %d, \"states_over_device_memory\": %.4f, "
      "\"device_budget_bytes\": %d, \"states_over_budget\": %.4f, \"step_ms\": %.3f, "
      "\"tokens_per_s\": %.1f, \"bytes_in_per_step\": %.0f, \"bytes_out_per_step\": %.0f, "
      "\"first_loss\": %.9g, \"final_loss\": %.9g}",
      JsonEscape(device), s.d, s.layers, s.tokens, s.layers * s.d * s.d, s.state_bytes(),
      device_total_bytes, static_cast<double>(s.state_bytes()) / device_total_bytes,
      offload_budget, static_cast<double>(s.state_bytes()) / offload_budget, r.median_ms(), tps,
      r.PerStep(&DeviceCacheStats::bytes_in), r.PerStep(&DeviceCacheStats::bytes_out),
      r.losses.front(), r.losses.back());
  return EmitJson(json, flags.json);
}

int RunBench(const Flags& flags) {
  const Shape s{flags.d, flags.layers, flags.tokens};
  // The offloaded budget: the backward holds three chunks at once (P_i, M_i, V_i).
  const int64_t offload_budget =
      static_cast<int64_t>(static_cast<double>(s.state_bytes()) / flags.over);
  const int64_t offload_capacity = offload_budget / s.chunk_bytes();
  if (offload_capacity < 3) {
    std::fprintf(stderr,
                 "offload_bench: --over: %g leaves %" PRId64 " device slot(s) for %d chunks; the "
                 "backward holds 3 at once (P, M, V): use --over <= %g\n",
                 flags.over, offload_capacity, s.num_chunks(), s.num_chunks() / 3.0);
    return kExitBadFlags;
  }
  if (memory::CudaDeviceCount() == 0) {
    std::printf("SKIP: no usable GPU\n");
    return kExitNoGpu;
  }
  auto run = [&]() -> absl::Status {
    SHOAL_ASSIGN_OR_RETURN(std::string device, memory::CudaDeviceDescription());
    int64_t free_bytes = 0, total_bytes = 0;
    SHOAL_RETURN_IF_ERROR(memory::CudaMemoryInfo(&free_bytes, &total_bytes));
    std::printf("device: %s; %.1f of %.1f GiB free\n", device.c_str(), free_bytes / 1073741824.0,
                total_bytes / 1073741824.0);
    std::printf("model: %" PRId64 " relu layers of %" PRId64 " x %" PRId64 ", %" PRId64
                " tokens/step, %.3g params; states %.2f GiB in %d chunks of %.1f MiB; "
                "activations %.2f GiB, other non-chunk %.2f GiB; %.3g FLOP/step; TF32 %s\n",
                s.layers, s.d, s.d, s.tokens, static_cast<double>(s.layers * s.d * s.d),
                s.state_bytes() / 1073741824.0, s.num_chunks(), s.chunk_bytes() / 1048576.0,
                s.activation_bytes() / 1073741824.0,
                (s.non_chunk_bytes() - s.activation_bytes()) / 1073741824.0, s.flops_per_step(),
                flags.tf32 ? "on" : "off");
    if (flags.offloaded_only) return RunOffloadedOnly(flags, s, device, total_bytes, offload_budget);
    // The resident config needs every chunk plus the non-chunk memory; leave room for cuBLAS.
    const int64_t need = s.state_bytes() + s.non_chunk_bytes() + (int64_t{1} << 30);
    if (need > free_bytes) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "the resident configuration needs %.1f GiB of device memory (states %.1f + non-chunk "
          "%.1f + 1 GiB for cuBLAS), %.1f GiB are free: lower --tokens, --d or --layers",
          need / 1073741824.0, s.state_bytes() / 1073741824.0, s.non_chunk_bytes() / 1073741824.0,
          free_bytes / 1073741824.0));
    }

    SHOAL_ASSIGN_OR_RETURN(std::unique_ptr<Compute> c, MakeCompute(s, flags.tf32 != 0));
    double h2d = 0, d2h = 0;
    SHOAL_RETURN_IF_ERROR(MeasureBandwidth(c->stream, &h2d, &d2h));
    std::printf("pinned host <-> device, one 256 MiB copy: H2D %.1f GB/s, D2H %.1f GB/s\n", h2d,
                d2h);

    // Each configuration on homes of its own, made from the same seed.
    Homes resident_homes, offloaded_homes;
    SHOAL_RETURN_IF_ERROR(MakeHomes(s, &resident_homes));
    SHOAL_ASSIGN_OR_RETURN(ConfigResult resident,
                           RunConfig(*c, "resident", s.state_bytes(),
                                     static_cast<int>(flags.prefetch), flags.steps,
                                     resident_homes));
    SHOAL_RETURN_IF_ERROR(MakeHomes(s, &offloaded_homes));
    SHOAL_ASSIGN_OR_RETURN(ConfigResult offloaded,
                           RunConfig(*c, "offloaded", offload_budget,
                                     static_cast<int>(flags.prefetch), flags.steps,
                                     offloaded_homes));

    std::string where;
    const bool same_losses = SameLosses(resident.losses, offloaded.losses);
    const bool same_states = SameStates(s, resident_homes, offloaded_homes, &where);
    const bool identical = same_losses && same_states;
    std::printf("bit-identical: losses %s, final P/M/V %s%s\n", same_losses ? "yes" : "NO",
                same_states ? "yes" : "NO",
                where.empty() ? "" : (" (first at " + where + ")").c_str());

    const int64_t timed = flags.steps - 1;
    SHOAL_ASSIGN_OR_RETURN(double predicted_resident,
                           PredictedLoadsPerStep(resident.trace, resident.capacity, timed));
    SHOAL_ASSIGN_OR_RETURN(double predicted,
                           PredictedLoadsPerStep(offloaded.trace, offloaded.capacity, timed));
    const double tps_resident = s.tokens / (resident.median_ms() / 1e3);
    const double tps_offloaded = s.tokens / (offloaded.median_ms() / 1e3);
    std::printf("\n%-9s %6s %10s %10s %8s %10s %10s %9s %9s %10s %10s %7s %8s\n", "config",
                "slots", "ms/step", "tokens/s", "TFLOP/s", "loads/st", "predicted", "demand",
                "evict/st", "MiB in/st", "MiB out/st", "max res", "misses");
    for (const ConfigResult* r : {&resident, &offloaded}) {
      const double predicted_r = r == &resident ? predicted_resident : predicted;
      std::printf("%-9s %6d %10.2f %10.0f %8.1f %10.2f %10.2f %9.2f %9.2f %10.1f %10.1f %7d "
                  "%8" PRId64 "\n",
                  r->name.c_str(), r->capacity, r->median_ms(), s.tokens / (r->median_ms() / 1e3),
                  s.flops_per_step() / (r->median_ms() / 1e3) / 1e12, r->loads_per_step(),
                  predicted_r, r->PerStep(&DeviceCacheStats::demand_loads),
                  r->PerStep(&DeviceCacheStats::evictions),
                  r->PerStep(&DeviceCacheStats::bytes_in) / 1048576.0,
                  r->PerStep(&DeviceCacheStats::bytes_out) / 1048576.0, r->end.max_resident,
                  r->end.trace_misses - r->timed_begin.trace_misses);
    }
    // What the copies alone would cost per step at the measured bandwidth, against the step.
    // Loads and write-backs run on separate streams, so in both directions of the link at once.
    const double in_ms = offloaded.PerStep(&DeviceCacheStats::bytes_in) / 1e9 / h2d * 1e3;
    const double out_ms = offloaded.PerStep(&DeviceCacheStats::bytes_out) / 1e9 / d2h * 1e3;
    std::printf("offloaded: copies alone would take %.1f ms/step in and %.1f ms/step out at the "
                "measured one-way bandwidths (%.1f ms if the two directions overlap fully, %.1f "
                "if not), the resident step %.1f ms\n",
                in_ms, out_ms, std::max(in_ms, out_ms), in_ms + out_ms, resident.median_ms());
    std::printf("throughput offloaded / resident: %.3f at %.2fx states over budget\n\n",
                tps_offloaded / tps_resident,
                static_cast<double>(s.state_bytes()) / offload_budget);

    const std::string json = absl::StrFormat(
        "{\"device\": \"%s\", \"d\": %d, \"layers\": %d, \"tokens_per_step\": %d, "
        "\"params\": %d, \"state_bytes\": %d, \"chunk_bytes\": %d, \"activation_bytes\": %d, "
        "\"non_chunk_bytes\": %d, \"device_budget_bytes\": %d, \"states_over_budget\": %.4f, "
        "\"capacity_chunks\": %d, \"prefetch_depth\": %d, \"tf32\": %d, \"timed_steps\": %d, "
        "\"step_ms_resident\": %.3f, \"step_ms_offloaded\": %.3f, "
        "\"tokens_per_s_resident\": %.1f, \"tokens_per_s_offloaded\": %.1f, "
        "\"throughput_ratio\": %.4f, \"tflops_resident\": %.2f, \"tflops_offloaded\": %.2f, "
        "\"loads_per_step\": %.2f, \"predicted_loads_per_step\": %.2f, "
        "\"demand_loads_per_step\": %.2f, \"evictions_per_step\": %.2f, "
        "\"bytes_in_per_step\": %.0f, \"bytes_out_per_step\": %.0f, \"max_resident_chunks\": %d, "
        "\"trace_misses\": %d, \"h2d_gb_s\": %.2f, \"d2h_gb_s\": %.2f, "
        "\"bit_identical\": %s, \"first_loss\": %.9g, \"final_loss\": %.9g}",
        JsonEscape(device), s.d, s.layers, s.tokens, s.layers * s.d * s.d, s.state_bytes(),
        s.chunk_bytes(), s.activation_bytes(), s.non_chunk_bytes(), offload_budget,
        static_cast<double>(s.state_bytes()) / offload_budget, offloaded.capacity, flags.prefetch,
        flags.tf32, timed, resident.median_ms(), offloaded.median_ms(), tps_resident,
        tps_offloaded, tps_offloaded / tps_resident,
        s.flops_per_step() / (resident.median_ms() / 1e3) / 1e12,
        s.flops_per_step() / (offloaded.median_ms() / 1e3) / 1e12, offloaded.loads_per_step(),
        predicted, offloaded.PerStep(&DeviceCacheStats::demand_loads),
        offloaded.PerStep(&DeviceCacheStats::evictions),
        offloaded.PerStep(&DeviceCacheStats::bytes_in),
        offloaded.PerStep(&DeviceCacheStats::bytes_out), offloaded.end.max_resident,
        offloaded.end.trace_misses - offloaded.timed_begin.trace_misses, h2d, d2h,
        identical ? "true" : "false", offloaded.losses.front(), offloaded.losses.back());
    SHOAL_RETURN_IF_ERROR(EmitJson(json, flags.json));
    if (!identical) {
      return absl::DataLossError("offloaded training is not bit-identical to resident training");
    }
    return absl::OkStatus();
  };
  const absl::Status status = run();
  if (!status.ok()) {
    std::printf("FAIL: %s\n", status.ToString().c_str());
    return kExitMismatch;
  }
  std::printf("PASS\n");
  return 0;
}

}  // namespace
}  // namespace shoal::bench

int main(int argc, char** argv) {
  absl::StatusOr<shoal::bench::Flags> flags = shoal::bench::ParseFlags(argc, argv);
  if (!flags.ok()) {
    if (absl::IsCancelled(flags.status())) {  // --help
      std::printf("%s", shoal::bench::kUsage);
      return 0;
    }
    std::fprintf(stderr, "offload_bench: %s\n%s", std::string(flags.status().message()).c_str(),
                 shoal::bench::kUsage);
    return shoal::bench::kExitBadFlags;
  }
  setvbuf(stdout, nullptr, _IOLBF, 0);
  return flags->check ? shoal::bench::RunCheck(*flags) : shoal::bench::RunBench(*flags);
}
