#include "runtime/profiler.h"

#include <google/protobuf/util/json_util.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/file_util.h"
#include "common/logging.h"
#include "common/status.h"
#include "runtime/device_probe.h"

namespace shoal::runtime {
namespace {

using Clock = std::chrono::steady_clock;

constexpr char kShoalVersion[] = "0.1.0";

std::string HostName() {
  char host[256] = {0};
  if (::gethostname(host, sizeof(host) - 1) != 0) return "unknown-host";
  return host;
}

// MemAvailable from /proc/meminfo: what the kernel estimates can be allocated without swapping,
// which is the honest budget for model states in host RAM (MemFree ignores reclaimable cache).
int64_t HostAvailableBytes() {
  std::ifstream in("/proc/meminfo");
  std::string line;
  while (std::getline(in, line)) {
    long long kb = 0;
    if (std::sscanf(line.c_str(), "MemAvailable: %lld kB", &kb) == 1) {
      return static_cast<int64_t>(kb) * 1024;
    }
  }
  return 0;
}

absl::StatusOr<int64_t> DiskFreeBytes(const std::string& path) {
  struct statvfs st;
  if (::statvfs(path.c_str(), &st) != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "profile: disk path '", path, "' cannot be read: ", std::strerror(errno)));
  }
  // f_bavail: blocks an unprivileged process may still fill.
  return static_cast<int64_t>(st.f_bavail) * static_cast<int64_t>(st.f_frsize);
}

// Best memcpy rate between two host buffers, in GB/s (bytes copied per second / 1e9). The
// buffers are touched first so page faults stay out of the timing.
double MeasureHostCopyGbps(double seconds) {
  // 64 MB is far beyond the last-level cache of the machines we run on; smaller when RAM is short.
  const int64_t avail = HostAvailableBytes();
  size_t bytes = size_t{64} << 20;
  if (avail > 0 && static_cast<int64_t>(bytes) * 8 > avail) {
    bytes = std::max<size_t>(size_t{1} << 20, static_cast<size_t>(avail / 8));
  }
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  std::memcpy(dst.data(), src.data(), bytes);  // warm-up
  double best = 0, spent = 0;
  for (int rep = 0; rep < 3 || spent < seconds; ++rep) {
    const auto t0 = Clock::now();
    std::memcpy(dst.data(), src.data(), bytes);
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    spent += s;
    if (s > 0) best = std::max(best, static_cast<double>(bytes) / s / 1e9);
    src[rep % bytes] ^= 1;  // a different source each time: nothing to skip
  }
  volatile char sink = dst[bytes / 2];
  (void)sink;
  return best;
}

// The machine's own rates are cached, unthrottled: every throttle divides the same measurement,
// so two devices throttled differently on one machine keep exactly the ratio of their throttles
// (two measurements taken under different loads need not).
std::string CacheKey(const std::string& host, const std::string& cpu, int cores) {
  return absl::StrFormat("%s|%s|%d cores", host, cpu, cores);
}

// The cache file as a JSON object; an unreadable or corrupt file reads as empty, with a
// warning (the caller rewrites it).
nlohmann::json LoadCache(const std::string& path) {
  auto text = ReadFileToString(path);
  if (!text.ok()) return nlohmann::json::object();
  nlohmann::json cache = nlohmann::json::parse(*text, nullptr, /*allow_exceptions=*/false);
  if (!cache.is_object()) {
    SHOAL_LOG(Warning) << "device profile cache " << path
                       << " is corrupt (not a JSON object); measuring again and rewriting it";
    return nlohmann::json::object();
  }
  return cache;
}

// A cached entry, if it parses as a DeviceProfile with positive measured rates at throttle 1.
std::optional<v1::DeviceProfile> CachedProfile(const nlohmann::json& cache, const std::string& key,
                                               const std::string& path) {
  if (!cache.contains(key)) return std::nullopt;
  v1::DeviceProfile profile;
  const auto status =
      google::protobuf::util::JsonStringToMessage(cache[key].dump(), &profile);
  // An entry holds the machine's own rates (throttle 1); any other is not one this build wrote.
  if (!status.ok() || !(profile.fp32_gflops() > 0) || !(profile.host_copy_gbps() > 0) ||
      profile.throttle() != 1.0) {
    SHOAL_LOG(Warning) << "device profile cache " << path << ": entry '" << key
                       << "' is corrupt or not this machine's own rates; measuring again";
    return std::nullopt;
  }
  return profile;
}

}  // namespace

absl::Status Throttle::CheckFactor(double factor, const char* what) {
  if (!std::isfinite(factor) || factor < 1.0) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " must be a finite number >= 1, got ", factor));
  }
  return absl::OkStatus();
}

WorkClock WorkClock::Start() {
  WorkClock c;
  c.cpu0_ = ProcessCpuSeconds();
  c.wall0_ = std::chrono::steady_clock::now();
  return c;
}

double WorkClock::Seconds() const {
  const double wall =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0_).count();
  const double cpu = ProcessCpuSeconds() - cpu0_;
  // A clock that could not be read (0 both times) leaves the wall time.
  return cpu > 0 ? std::min(wall, cpu) : wall;
}

double WorkClock::ProcessCpuSeconds() {
  timespec ts{};
  if (::clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts) != 0) return 0;
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

double Throttle::After(double work_seconds) const {
  if (factor_ <= 1.0 || !(work_seconds > 0)) return 0;
  const double sleep_s = (factor_ - 1.0) * work_seconds;
  std::this_thread::sleep_for(std::chrono::duration<double>(sleep_s));
  return sleep_s;
}

absl::StatusOr<v1::DeviceProfile> ProfileDevice(const ProfileOptions& options) {
  SHOAL_RETURN_IF_ERROR(Throttle::CheckFactor(options.throttle, "profile: throttle"));
  if (!std::isfinite(options.seconds) || options.seconds <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("profile: seconds must be > 0, got ", options.seconds));
  }
  if (options.disk_path.empty() || !PathExists(options.disk_path)) {
    return absl::InvalidArgumentError(
        absl::StrCat("profile: disk path '", options.disk_path, "' does not exist"));
  }
  const std::string host = HostName();
  const std::string cpu = CpuModel();
  const int cores = AvailableCores();
  const std::string key = CacheKey(host, cpu, cores);
  const std::string dir = CacheDir();
  const std::string path = dir + "/profile.json";

  nlohmann::json cache = LoadCache(path);
  std::optional<v1::DeviceProfile> cached;
  if (!options.refresh) cached = CachedProfile(cache, key, path);

  v1::DeviceProfile profile;
  if (cached) {
    profile = *cached;
  } else {
    // The time budget goes mostly to fp32, the rate the solver uses; bf16 is informational on
    // a CPU (LibTorch 1.13 has no fast bf16 GEMM without oneDNN), memcpy needs little.
    const double fp32 = MeasureGemmGflops(GemmType::kFloat32, 256, 2048, 0.6 * options.seconds, 3);
    const double bf16 = MeasureGemmGflops(GemmType::kBFloat16, 128, 1024, 0.3 * options.seconds, 2);
    const double copy = MeasureHostCopyGbps(0.1 * options.seconds);
    if (!(fp32 > 0)) {
      return absl::InternalError("profile: the fp32 GEMM measurement failed (rate 0)");
    }
    profile.set_host(host);
    profile.set_kind(v1::DEVICE_KIND_CPU);
    profile.set_device_name(absl::StrCat(cpu, " (", cores, cores == 1 ? " core)" : " cores)"));
    profile.set_fp32_gflops(fp32);
    profile.set_bf16_gflops(bf16);
    profile.set_host_copy_gbps(copy);
    profile.set_cores(cores);
    profile.set_throttle(1.0);
    profile.set_shoal_version(kShoalVersion);
    std::string json;
    google::protobuf::util::JsonPrintOptions jo;
    jo.preserve_proto_field_names = true;
    if (google::protobuf::util::MessageToJsonString(profile, &json, jo).ok()) {
      cache[key] = nlohmann::json::parse(json, nullptr, /*allow_exceptions=*/false);
      absl::Status s = MakeDirs(dir);
      if (s.ok()) s = WriteFileAtomic(path, cache.dump(2) + "\n");
      if (!s.ok()) SHOAL_LOG(Warning) << "could not cache the device profile: " << s.message();
    }
  }
  profile.set_fp32_gflops(profile.fp32_gflops() / options.throttle);
  profile.set_bf16_gflops(profile.bf16_gflops() / options.throttle);
  profile.set_host_copy_gbps(profile.host_copy_gbps() / options.throttle);
  profile.set_throttle(options.throttle);
  // Free memory and disk change from run to run: always measured now, never cached. So are the
  // network figures, which the caller measures against its coordinator.
  v1::MemoryTiers* memory = profile.mutable_memory();
  memory->set_gpu_bytes(0);  // this build has no CUDA device
  memory->set_host_bytes(HostAvailableBytes());
  SHOAL_ASSIGN_OR_RETURN(const int64_t disk, DiskFreeBytes(options.disk_path));
  memory->set_disk_bytes(disk);
  profile.set_h2d_gbps(0);
  profile.set_d2h_gbps(0);
  profile.set_net_gbps(0);
  profile.set_rtt_ms(0);
  profile.set_blas(DescribeBlas());  // the library can change under a cached profile
  // MFU's denominator, as mesh mode's trainer takes it (cached per machine on its own).
  SHOAL_ASSIGN_OR_RETURN(const double peak, PeakGflops());
  profile.set_peak_gflops(peak);
  return profile;
}

}  // namespace shoal::runtime
