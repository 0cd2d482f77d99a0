#include "scheduler/validate.h"

#include <cmath>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace shoal::scheduler {
namespace {

// Field paths are written as the JoinRequest spells them ("device.memory.host_bytes"), so an
// operator can find the offending value in the worker's profile or the job's config.

constexpr double kMinGflops = 1e-3;

absl::Status Bad(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(field, " ", what));
}

// A double the coordinator can do arithmetic with: finite and inside [lo, hi].
absl::Status CheckDouble(double v, double lo, double hi, absl::string_view field) {
  if (!std::isfinite(v)) return Bad(field, absl::StrCat("must be finite, got ", v));
  if (v < lo || v > hi) {
    return Bad(field, absl::StrCat("must be in [", lo, ", ", hi, "], got ", v));
  }
  return absl::OkStatus();
}

absl::Status CheckInt(int64_t v, int64_t lo, int64_t hi, absl::string_view field) {
  if (v < lo || v > hi) {
    return Bad(field, absl::StrCat("must be in [", lo, ", ", hi, "], got ", v));
  }
  return absl::OkStatus();
}

// Text that ends up in logs, tables and JSON: bounded, no control bytes (UTF-8 is allowed).
absl::Status CheckText(const std::string& s, bool required, const ValidationLimits& limits,
                       absl::string_view field) {
  if (required && s.empty()) return Bad(field, "must not be empty");
  if (s.size() > static_cast<size_t>(limits.max_string_bytes)) {
    return Bad(field, absl::StrCat("is ", s.size(), " bytes; at most ", limits.max_string_bytes,
                                   " allowed"));
  }
  for (unsigned char c : s) {
    if (c < 0x20 || c == 0x7f) {
      return Bad(field, absl::StrCat("contains the control byte 0x", absl::Hex(c)));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckTiers(const v1::MemoryTiers& m, const ValidationLimits& limits,
                        absl::string_view field) {
  const struct {
    int64_t v;
    const char* name;
  } tiers[] = {{m.gpu_bytes(), "gpu_bytes"}, {m.host_bytes(), "host_bytes"},
               {m.disk_bytes(), "disk_bytes"}};
  for (const auto& t : tiers) {
    const std::string name = absl::StrCat(field, ".", t.name);
    if (t.v < 0) return Bad(name, absl::StrCat("must be >= 0, got ", t.v));
    if (t.v > limits.max_tier_bytes) {
      return Bad(name, absl::StrCat("must be <= ", limits.max_tier_bytes, ", got ", t.v));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckDevice(const v1::DeviceProfile& d, const ValidationLimits& limits,
                         absl::string_view p) {
  auto f = [&](const char* name) { return absl::StrCat(p, ".", name); };
  absl::Status s = CheckText(d.host(), /*required=*/true, limits, f("host"));
  if (!s.ok()) return s;
  if (d.kind() != v1::DEVICE_KIND_CPU && d.kind() != v1::DEVICE_KIND_CUDA) {
    return Bad(f("kind"), absl::StrCat("is not a known device kind (got ", d.kind(),
                                       "; expected DEVICE_KIND_CPU or DEVICE_KIND_CUDA)"));
  }
  if (!(s = CheckText(d.device_name(), false, limits, f("device_name"))).ok()) return s;
  if (!(s = CheckText(d.blas(), false, limits, f("blas"))).ok()) return s;
  if (!(s = CheckTiers(d.memory(), limits, f("memory"))).ok()) return s;
  if (d.kind() == v1::DEVICE_KIND_CPU && d.memory().gpu_bytes() != 0) {
    return Bad(f("memory.gpu_bytes"),
               absl::StrCat("must be 0 for a CPU device, got ", d.memory().gpu_bytes()));
  }
  if (d.memory().gpu_bytes() == 0 && d.memory().host_bytes() == 0) {
    return Bad(f("memory"), "has neither GPU nor host bytes: nothing could be placed there");
  }
  // A device that computes nothing cannot be given layers; a rate beyond any real chip is a
  // broken measurement or a lie, and either would steer the whole layout.
  // The floor (1 MFLOP/s) also keeps predicted times finite: a denormal rate would make every
  // time the solver computes infinite (found by the fuzz target).
  if (!std::isfinite(d.fp32_gflops()) || d.fp32_gflops() < kMinGflops) {
    return Bad(f("fp32_gflops"), absl::StrCat("must be finite and >= ", kMinGflops,
                                              " (1 MFLOP/s), got ", d.fp32_gflops()));
  }
  if (!(s = CheckDouble(d.fp32_gflops(), 0, limits.max_gflops, f("fp32_gflops"))).ok()) return s;
  if (!(s = CheckDouble(d.bf16_gflops(), 0, limits.max_gflops, f("bf16_gflops"))).ok()) return s;
  // 0: not measured (an older worker); MFU then leaves the host out.
  if (!(s = CheckDouble(d.peak_gflops(), 0, limits.max_gflops, f("peak_gflops"))).ok()) return s;
  if (!(s = CheckDouble(d.h2d_gbps(), 0, limits.max_gbps, f("h2d_gbps"))).ok()) return s;
  if (!(s = CheckDouble(d.d2h_gbps(), 0, limits.max_gbps, f("d2h_gbps"))).ok()) return s;
  if (!(s = CheckDouble(d.host_copy_gbps(), 0, limits.max_gbps, f("host_copy_gbps"))).ok()) {
    return s;
  }
  if (!(s = CheckDouble(d.net_gbps(), 0, limits.max_gbps, f("net_gbps"))).ok()) return s;
  // An hour of round trip is no network a training job can use.
  if (!(s = CheckDouble(d.rtt_ms(), 0, 3.6e6, f("rtt_ms"))).ok()) return s;
  if (!(s = CheckText(d.shoal_version(), false, limits, f("shoal_version"))).ok()) return s;
  if (!(s = CheckInt(d.cores(), 0, 1 << 20, f("cores"))).ok()) return s;
  // 0 means "not set" (an older worker); otherwise a slowdown factor >= 1.
  if (d.throttle() != 0) {
    if (!(s = CheckDouble(d.throttle(), 1, 1e6, f("throttle"))).ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status CheckModel(const v1::ModelSpec& m, const ValidationLimits& limits,
                        absl::string_view p) {
  auto f = [&](const char* name) { return absl::StrCat(p, ".", name); };
  absl::Status s;
  if (!(s = CheckInt(m.n_layer(), 1, limits.max_layers, f("n_layer"))).ok()) return s;
  if (!(s = CheckInt(m.n_head(), 1, limits.max_width, f("n_head"))).ok()) return s;
  if (!(s = CheckInt(m.n_embd(), 1, limits.max_width, f("n_embd"))).ok()) return s;
  if (m.n_embd() % m.n_head() != 0) {
    return Bad(f("n_embd"), absl::StrCat("(", m.n_embd(), ") must be a multiple of ", p,
                                         ".n_head (", m.n_head(), ")"));
  }
  if (!(s = CheckInt(m.block_size(), 1, limits.max_width, f("block_size"))).ok()) return s;
  if (!(s = CheckInt(m.vocab_size(), 1, limits.max_vocab, f("vocab_size"))).ok()) return s;
  // Bytes per parameter: fp8 is 1, an fp64 AdamW state 16; 64 leaves room and rejects garbage.
  if (!std::isfinite(m.param_bytes()) || m.param_bytes() <= 0 || m.param_bytes() > 64) {
    return Bad(f("param_bytes"), absl::StrCat("must be in (0, 64], got ", m.param_bytes()));
  }
  if (!(s = CheckDouble(m.grad_bytes(), 0, 64, f("grad_bytes"))).ok()) return s;
  if (!(s = CheckDouble(m.optimizer_bytes(), 0, 64, f("optimizer_bytes"))).ok()) return s;
  return absl::OkStatus();
}

absl::Status CheckJob(const v1::JobSpec& j, const ValidationLimits& limits, absl::string_view p) {
  auto f = [&](const char* name) { return absl::StrCat(p, ".", name); };
  absl::Status s = CheckText(j.name(), false, limits, f("name"));
  if (!s.ok()) return s;
  if (!j.has_model()) return Bad(f("model"), "is missing");
  if (!(s = CheckModel(j.model(), limits, f("model"))).ok()) return s;
  if (!(s = CheckInt(j.global_batch(), 1, limits.max_global_batch, f("global_batch"))).ok()) {
    return s;
  }
  if (!(s = CheckInt(j.expected_workers(), 0, limits.max_workers, f("expected_workers"))).ok()) {
    return s;
  }
  if (!(s = CheckInt(j.max_tp(), 0, limits.max_workers, f("max_tp"))).ok()) return s;
  if (!(s = CheckInt(j.max_pp(), 0, limits.max_layers, f("max_pp"))).ok()) return s;
  if (!(s = CheckInt(j.max_micro_batch(), 0, limits.max_global_batch, f("max_micro_batch"))).ok()) {
    return s;
  }
  return absl::OkStatus();
}

// A worker's own memory plan: a few named states, each with its bytes per tier.
absl::Status CheckPlan(const v1::MemoryPlan& plan, const ValidationLimits& limits,
                       absl::string_view p) {
  auto f = [&](const std::string& name) { return absl::StrCat(p, ".", name); };
  absl::Status s;
  constexpr int kMaxStates = 16;
  if (plan.states_size() > kMaxStates) {
    return Bad(f("states"), absl::StrCat("has ", plan.states_size(), " entries; at most ",
                                         kMaxStates, " allowed"));
  }
  for (int i = 0; i < plan.states_size(); ++i) {
    const v1::StatePlacement& st = plan.states(i);
    const std::string at = absl::StrCat("states[", i, "]");
    if (!(s = CheckText(st.state(), /*required=*/true, limits, f(at + ".state"))).ok()) return s;
    if (!(s = CheckTiers(st.bytes(), limits, f(at + ".bytes"))).ok()) return s;
  }
  if (!(s = CheckTiers(plan.peak(), limits, f("peak"))).ok()) return s;
  return CheckTiers(plan.budget(), limits, f("budget"));
}

absl::Status CheckStats(const v1::StepStats& st, const ValidationLimits& limits,
                        absl::string_view p) {
  auto f = [&](const char* name) { return absl::StrCat(p, ".", name); };
  absl::Status s;
  if (!(s = CheckInt(st.step(), 0, int64_t{1} << 53, f("step"))).ok()) return s;
  if (!std::isfinite(st.loss())) {
    return Bad(f("loss"), absl::StrCat("must be finite, got ", st.loss()));
  }
  if (!(s = CheckDouble(st.tokens_per_s(), 0, 1e15, f("tokens_per_s"))).ok()) return s;
  // A step longer than a day is no measurement the rebalancer should act on.
  if (!(s = CheckDouble(st.step_time_s(), 0, 86400, f("step_time_s"))).ok()) return s;
  if (!(s = CheckDouble(st.lr(), 0, 1e6, f("lr"))).ok()) return s;
  if (!(s = CheckDouble(st.predicted_step_s(), 0, 86400, f("predicted_step_s"))).ok()) return s;
  if (!(s = CheckPlan(st.memory_plan(), limits, f("memory_plan"))).ok()) return s;
  return CheckTiers(st.memory_used(), limits, f("memory_used"));
}

}  // namespace

absl::Status ValidateWorkerId(const std::string& worker_id, const char* field,
                              const ValidationLimits& limits) {
  if (worker_id.empty()) return Bad(field, "must not be empty");
  if (worker_id.size() > static_cast<size_t>(limits.max_string_bytes)) {
    return Bad(field, absl::StrCat("is ", worker_id.size(), " bytes; at most ",
                                   limits.max_string_bytes, " allowed"));
  }
  // Ids appear in logs, tables, metric labels and file names: a conservative alphabet.
  for (unsigned char c : worker_id) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '-' || c == '_' || c == '.' || c == ':' || c == '@';
    if (!ok) {
      return Bad(field, absl::StrCat("may hold only letters, digits and - _ . : @ (got byte 0x",
                                     absl::Hex(c), ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateDeviceProfile(const v1::DeviceProfile& device,
                                   const ValidationLimits& limits) {
  return CheckDevice(device, limits, "device");
}

absl::Status ValidateJobSpec(const v1::JobSpec& job, const ValidationLimits& limits) {
  return CheckJob(job, limits, "job");
}

absl::Status ValidateJoin(const v1::JoinRequest& request, const ValidationLimits& limits) {
  // The version first: a peer of another version may fill the other fields differently.
  if (request.protocol_version() != kProtocolVersion) {
    return absl::FailedPreconditionError(absl::StrCat(
        "protocol_version: the worker speaks version ", request.protocol_version(),
        ", this coordinator speaks version ", kProtocolVersion,
        "; run the same shoal release on both"));
  }
  if (!request.has_device()) return Bad("device", "is missing");
  absl::Status s = ValidateDeviceProfile(request.device(), limits);
  if (!s.ok()) return s;
  if (!request.has_job()) return Bad("job", "is missing");
  if (!(s = ValidateJobSpec(request.job(), limits)).ok()) return s;
  if (!(s = CheckInt(request.mesh_rank(), -1, limits.max_workers - 1, "mesh_rank")).ok()) {
    return s;
  }
  if (!request.name().empty()) return ValidateWorkerId(request.name(), "name", limits);
  return absl::OkStatus();
}

absl::Status ValidateHeartbeat(const v1::HeartbeatRequest& request,
                               const ValidationLimits& limits) {
  absl::Status s = ValidateWorkerId(request.worker_id(), "worker_id", limits);
  if (!s.ok()) return s;
  return CheckStats(request.stats(), limits, "stats");
}

absl::Status ValidateLeave(const v1::LeaveRequest& request, const ValidationLimits& limits) {
  absl::Status s = ValidateWorkerId(request.worker_id(), "worker_id", limits);
  if (!s.ok()) return s;
  return CheckText(request.reason(), false, limits, "reason");
}

absl::Status ValidatePing(const v1::PingRequest& request, const ValidationLimits& limits) {
  if (request.payload().size() > static_cast<size_t>(limits.max_ping_payload_bytes)) {
    return Bad("payload", absl::StrCat("is ", request.payload().size(), " bytes; at most ",
                                       limits.max_ping_payload_bytes, " allowed"));
  }
  return absl::OkStatus();
}

}  // namespace shoal::scheduler
