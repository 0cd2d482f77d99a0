// `shoal profile`: this machine's device profile, as a worker sends it when it joins.
#include <google/protobuf/util/json_util.h>

#include <cstdio>
#include <iostream>
#include <string>

#include <CLI/CLI.hpp>

#include "absl/strings/str_format.h"
#include "launch/exit_code.h"
#include "launch/subcommands.h"
#include "runtime/device_probe.h"
#include "runtime/profiler.h"

namespace shoal::launch {
namespace {

std::string Bytes(int64_t b) {
  const double gib = static_cast<double>(b) / (1ull << 30);
  return absl::StrFormat("%.1f GiB", gib);
}

std::string ProfileJson(const v1::DeviceProfile& p) {
  std::string json;
  google::protobuf::util::JsonPrintOptions o;
  o.preserve_proto_field_names = true;
  o.always_print_primitive_fields = true;
  (void)google::protobuf::util::MessageToJsonString(p, &json, o);
  return json;
}

void PrintProfileTable(const v1::DeviceProfile& p, const std::string& disk_path) {
  std::printf("host            %s\n", p.host().c_str());
  std::printf("device          %s\n", p.device_name().c_str());
  std::printf("kind            %s\n", v1::DeviceKind_Name(p.kind()).c_str());
  std::printf("cores           %d\n", p.cores());
  std::printf("fp32 GEMM       %.1f GFLOP/s\n", p.fp32_gflops());
  std::printf("bf16 GEMM       %s\n",
              p.bf16_gflops() > 0 ? absl::StrFormat("%.1f GFLOP/s", p.bf16_gflops()).c_str()
                                  : "unsupported");
  std::printf("host memcpy     %.1f GB/s\n", p.host_copy_gbps());
  std::printf("host RAM        %s available\n", Bytes(p.memory().host_bytes()).c_str());
  std::printf("disk            %s free under %s\n", Bytes(p.memory().disk_bytes()).c_str(),
              disk_path.c_str());
  std::printf("GPU memory      %s\n", p.memory().gpu_bytes() > 0
                                          ? Bytes(p.memory().gpu_bytes()).c_str()
                                          : "none (CPU build)");
  std::printf("throttle        %g%s\n", p.throttle(),
              p.throttle() > 1 ? " (rates divided by it on purpose)" : "");
  std::printf("shoal           %s\n", p.shoal_version().c_str());
}

}  // namespace

int ProfileMain(int argc, char** argv) {
  CLI::App app{"Measure this machine's device profile, as a worker sends it to the coordinator"};
  app.name("shoal profile");
  runtime::ProfileOptions o;
  bool json = false;
  app.add_option("--throttle", o.throttle, "Slow-down factor >= 1 (rates are divided by it)")
      ->capture_default_str();
  app.add_flag("--refresh", o.refresh,
               "Measure again even when cached (also the GEMM peak that MFU divides by)");
  app.add_option("--disk-path", o.disk_path, "Folder of the disk tier (free bytes counted there)")
      ->capture_default_str();
  app.add_option("--seconds", o.seconds, "Time budget of the GEMM measurements")
      ->capture_default_str();
  app.add_flag("--json", json, "Print the profile as proto3 JSON (the proto's field names)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  if (o.refresh) {
    // The MFU denominator is cached beside the profile; a refresh renews both (a peak measured
    // while the machine was busy makes MFU read high).
    for (runtime::GemmType type : {runtime::GemmType::kFloat32, runtime::GemmType::kBFloat16}) {
      if (auto peak = runtime::PeakGflops(/*refresh=*/true, type); !peak.ok()) {
        return Fail(peak.status());
      }
    }
  }
  auto profile = runtime::ProfileDevice(o);
  if (!profile.ok()) return Fail(profile.status());
  if (json) {
    std::cout << ProfileJson(*profile) << std::endl;
  } else {
    PrintProfileTable(*profile, o.disk_path);
  }
  return 0;
}

}  // namespace shoal::launch
