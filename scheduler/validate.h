// Checks every request that reaches the coordinator before any of it is used. A bad field gives
// kInvalidArgument whose message names it ("device.memory.host_bytes must be >= 0, got -1"), a
// wrong protocol version kFailedPrecondition naming both versions. Pure functions: the gRPC
// service, the simulator and the fuzz target call the same ones.
#ifndef SHOAL_SCHEDULER_VALIDATE_H_
#define SHOAL_SCHEDULER_VALIDATE_H_

#include <cstdint>

#include "absl/status/status.h"
#include "proto/coordinator.pb.h"

namespace shoal::scheduler {

// Version of the protocol in proto/coordinator.proto that this build speaks.
inline constexpr uint32_t kProtocolVersion = v1::PROTOCOL_VERSION_CURRENT;

// Limits on what a peer may claim. Beyond them a value is an error, not a device.
struct ValidationLimits {
  double max_gflops = 1e7;            // 10 PFLOP/s per device
  double max_gbps = 1e4;              // 10 TB/s for any bandwidth
  int64_t max_tier_bytes = int64_t{1} << 50;  // 1 PiB per tier
  int max_string_bytes = 256;         // host, device name, ids, reasons
  int max_layers = 100000;
  int max_width = 1 << 20;
  int max_vocab = 1 << 24;
  int max_global_batch = 1 << 24;
  int max_workers = 1 << 20;
  int max_ping_payload_bytes = 4 << 20;
};

absl::Status ValidateDeviceProfile(const v1::DeviceProfile& device,
                                   const ValidationLimits& limits = {});
absl::Status ValidateJobSpec(const v1::JobSpec& job, const ValidationLimits& limits = {});
absl::Status ValidateJoin(const v1::JoinRequest& request, const ValidationLimits& limits = {});
absl::Status ValidateHeartbeat(const v1::HeartbeatRequest& request,
                               const ValidationLimits& limits = {});
absl::Status ValidateWorkerId(const std::string& worker_id, const char* field,
                              const ValidationLimits& limits = {});
absl::Status ValidateLeave(const v1::LeaveRequest& request, const ValidationLimits& limits = {});
absl::Status ValidatePing(const v1::PingRequest& request, const ValidationLimits& limits = {});

}  // namespace shoal::scheduler

#endif  // SHOAL_SCHEDULER_VALIDATE_H_
