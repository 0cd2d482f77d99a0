// libFuzzer target for what reaches the coordinator from the network. The first byte picks a
// mode:
//   - 0..5: the rest is parsed (ParseFromArray) as one request type and, if it parses, validated
//     and handed to a fresh CoordinatorCore (Join, Heartbeat, Leave, Drain, WatchAssignment,
//     Ping's validation);
//   - 6..7: the rest is a program of Join / Heartbeat / Leave / Drain / Rebalance / Status /
//     clock-advance / WaitAssignment calls against one CoordinatorCore on a ManualClock.
// Besides "no crash" (and AddressSanitizer's checks), every call must end in one of the status
// codes its contract documents, and the status must stay consistent (see CheckStatus). A broken
// invariant aborts, which libFuzzer reports as a crash with the input that caused it.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "proto/coordinator.pb.h"
#include "scheduler/clock.h"
#include "scheduler/coordinator_core.h"
#include "scheduler/validate.h"

namespace shoal::scheduler {
namespace {

[[noreturn]] void Violation(const std::string& what) {
  std::fprintf(stderr, "coordinator_fuzz: invariant broken: %s\n", what.c_str());
  std::abort();
}

void ExpectCode(const char* call, const absl::Status& s,
                std::initializer_list<absl::StatusCode> allowed) {
  for (absl::StatusCode c : allowed) {
    if (s.code() == c) return;
  }
  Violation(absl::StrCat(call, " returned an undocumented status: ", s.ToString()));
}

// What must hold of any status the core reports, given the versions it reported before.
void CheckStatus(const CoordinatorCore& core, uint64_t* last_version) {
  const v1::ClusterStatus s = core.Status();
  const uint64_t v = s.layout().version();
  if (v < *last_version) {
    Violation(absl::StrCat("layout version went back from ", *last_version, " to ", v));
  }
  *last_version = v;
  if (s.health() != "waiting" && s.health() != "healthy" && s.health() != "degraded") {
    Violation("health is " + s.health());
  }
  if ((v == 0) != (s.health() == "waiting")) {
    Violation(absl::StrCat("health ", s.health(), " with layout version ", v));
  }
  if (s.job_status().history_size() > core.options().history_points) {
    Violation("history longer than its bound");
  }
  std::set<std::string> ids, in_layout;
  for (const v1::Placement& p : s.layout().placements()) in_layout.insert(p.worker_id());
  for (const v1::WorkerStatus& w : s.workers()) {
    if (!ids.insert(w.worker_id()).second) Violation("worker listed twice: " + w.worker_id());
    if (w.assignment().version() > v) Violation("assignment newer than the layout");
    // A dead or draining worker may still hold its place until the next solve; one that left
    // may not, and nobody is placed outside the layout.
    if (w.assignment().placed() && w.state() == v1::WORKER_STATE_LEFT) {
      Violation(absl::StrCat("worker ", w.worker_id(), " left but is still placed"));
    }
    if (w.assignment().placed() && in_layout.count(w.worker_id()) == 0) {
      Violation(absl::StrCat("worker ", w.worker_id(), " placed but not in the layout"));
    }
    if (w.assignment().placed() &&
        (w.assignment().first_layer() < 0 ||
         w.assignment().end_layer() <= w.assignment().first_layer() ||
         w.assignment().end_layer() > s.job().model().n_layer())) {
      Violation(absl::StrCat("worker ", w.worker_id(), " got layers [",
                             w.assignment().first_layer(), ", ", w.assignment().end_layer(),
                             ")"));
    }
  }
  const v1::Counters& c = s.counters();
  if (c.joins_total() < 0 || c.leaves_total() < 0 || c.heartbeats_total() < 0 ||
      c.expirations_total() < 0 || c.layouts_total() < 0 || c.rejected_requests_total() < 0) {
    Violation("a counter is negative");
  }
  if (c.layouts_total() != static_cast<int64_t>(v)) {
    Violation(absl::StrCat(c.layouts_total(), " layouts counted, version ", v));
  }
}

CoordinatorOptions Options() {
  CoordinatorOptions o;
  o.lease_ms = 1000;
  o.heartbeat_interval_ms = 250;
  o.history_points = 8;
  return o;
}

// Reads the program bytes; 0 once they run out.
class Bytes {
 public:
  Bytes(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  bool empty() const { return pos_ >= size_; }
  uint8_t U8() { return pos_ < size_ ? data_[pos_++] : 0; }
  uint32_t U32() {
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v = (v << 8) | U8();
    return v;
  }
  double F64() {
    uint64_t bits = 0;
    for (int i = 0; i < 8; ++i) bits = (bits << 8) | U8();
    double d;
    std::memcpy(&d, &bits, sizeof(d));
    return d;
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

v1::JobSpec SmallJob(int variant) {
  v1::JobSpec job;
  job.set_name("fuzz");
  v1::ModelSpec* m = job.mutable_model();
  m->set_n_layer(2 + variant % 7);
  m->set_n_head(2);
  m->set_n_embd(64);
  m->set_block_size(32);
  m->set_vocab_size(256);
  m->set_param_bytes(4);
  m->set_grad_bytes(4);
  m->set_optimizer_bytes(8);
  job.set_global_batch(1 + variant % 16);
  job.set_expected_workers(variant % 4);
  return job;
}

v1::DeviceProfile Device(Bytes& in) {
  v1::DeviceProfile p;
  const uint8_t b = in.U8();
  p.set_host(absl::StrCat("h", b % 4));
  p.set_kind(b & 0x80 ? v1::DEVICE_KIND_CUDA : v1::DEVICE_KIND_CPU);
  p.set_device_name("fuzz device");
  if (p.kind() == v1::DEVICE_KIND_CUDA) p.mutable_memory()->set_gpu_bytes(int64_t{1} << (20 + b % 20));
  p.mutable_memory()->set_host_bytes(int64_t{1} << (16 + in.U8() % 24));
  p.mutable_memory()->set_disk_bytes((b & 0x40) ? int64_t{1} << 34 : 0);
  p.set_fp32_gflops(1 + in.U8() * 10.0);
  p.set_net_gbps((b & 0x20) ? 0 : 1 + b % 10);
  p.set_cores(1 + b % 8);
  p.set_throttle(1);
  if ((b & 0x0f) == 0x0f) p.set_fp32_gflops(in.F64());  // anything, NaN included
  return p;
}

// The ids the program refers to: some joined, some never.
std::string PickId(Bytes& in, const std::vector<std::string>& joined) {
  const uint8_t b = in.U8();
  if (!joined.empty() && b < 200) return joined[b % joined.size()];
  return b % 2 ? "nobody" : "bad id!";
}

void RunProgram(Bytes& in) {
  ManualClock clock(1'000'000);
  CoordinatorCore core(Options(), &clock);
  const int job_variant = in.U8();
  std::vector<std::string> joined;
  uint64_t version = 0;
  for (int op = 0; op < 64 && !in.empty(); ++op) {
    switch (in.U8() % 8) {
      case 0: {  // Join
        v1::JoinRequest r;
        r.set_protocol_version(in.U8() == 0xff ? 2 : kProtocolVersion);
        *r.mutable_device() = Device(in);
        const uint8_t j = in.U8();
        *r.mutable_job() = SmallJob(j < 224 ? job_variant : j);  // mostly the job's own spec
        const uint8_t n = in.U8();
        r.set_mesh_rank(n % 3 == 0 ? n % 5 : -1);
        if (n % 3 == 1) r.set_name(absl::StrCat("n", n % 6));
        auto s = core.Join(r);
        ExpectCode("Join", s.status(),
                   {absl::StatusCode::kOk, absl::StatusCode::kInvalidArgument,
                    absl::StatusCode::kFailedPrecondition, absl::StatusCode::kAlreadyExists,
                    absl::StatusCode::kResourceExhausted});
        if (s.ok()) {
          if (s->lease_ms() != 1000 || s->heartbeat_interval_ms() != 250) {
            Violation("Join returned other lease terms");
          }
          joined.push_back(s->worker_id());
        }
        break;
      }
      case 1: {  // Heartbeat
        v1::HeartbeatRequest r;
        r.set_worker_id(PickId(in, joined));
        const uint8_t b = in.U8();
        if (b & 1) {
          v1::StepStats* st = r.mutable_stats();
          st->set_step(in.U8());
          st->set_loss((b & 2) ? in.F64() : 2.0 + in.U8() / 64.0);
          st->set_tokens_per_s(in.U8() * 100.0);
          st->set_step_time_s((b & 4) ? in.F64() : in.U8() / 16.0);
        }
        auto s = core.Heartbeat(r);
        ExpectCode("Heartbeat", s.status(),
                   {absl::StatusCode::kOk, absl::StatusCode::kInvalidArgument,
                    absl::StatusCode::kNotFound, absl::StatusCode::kFailedPrecondition});
        if (s.ok() && s->assignment_version() > core.Status().layout().version()) {
          Violation("heartbeat names a future layout");
        }
        break;
      }
      case 2: {  // Leave
        v1::LeaveRequest r;
        r.set_worker_id(PickId(in, joined));
        r.set_reason("fuzz");
        ExpectCode("Leave", core.Leave(r),
                   {absl::StatusCode::kOk, absl::StatusCode::kInvalidArgument,
                    absl::StatusCode::kNotFound});
        break;
      }
      case 3: {  // Drain
        ExpectCode("Drain", core.Drain(PickId(in, joined)).status(),
                   {absl::StatusCode::kOk, absl::StatusCode::kInvalidArgument,
                    absl::StatusCode::kNotFound, absl::StatusCode::kFailedPrecondition});
        break;
      }
      case 4: {  // Rebalance
        ExpectCode("Rebalance", core.Rebalance().status(),
                   {absl::StatusCode::kOk, absl::StatusCode::kFailedPrecondition,
                    absl::StatusCode::kResourceExhausted, absl::StatusCode::kInvalidArgument});
        break;
      }
      case 5:
        CheckStatus(core, &version);
        break;
      case 6:
        clock.AdvanceMs(in.U8() * 20);
        core.ExpireLeases();
        break;
      case 7: {
        auto s = core.WaitAssignment(PickId(in, joined), in.U8() % 4, absl::ZeroDuration());
        ExpectCode("WaitAssignment", s.status(),
                   {absl::StatusCode::kOk, absl::StatusCode::kNotFound,
                    absl::StatusCode::kFailedPrecondition});
        break;
      }
    }
  }
  CheckStatus(core, &version);
}

// One message of the wire, parsed and sent to a fresh core (which validates it itself).
void RunMessage(uint8_t mode, const uint8_t* data, size_t size) {
  ManualClock clock(1'000'000);
  CoordinatorCore core(Options(), &clock);
  uint64_t version = 0;
  const int n = static_cast<int>(size);
  switch (mode) {
    case 0: {
      v1::JoinRequest r;
      if (!r.ParseFromArray(data, n)) return;
      const absl::Status v = ValidateJoin(r);
      auto s = core.Join(r);
      if (v.ok() != s.ok() && s.status().code() != absl::StatusCode::kResourceExhausted) {
        Violation("Join and ValidateJoin disagree: " + v.ToString() + " / " + s.status().ToString());
      }
      ExpectCode("Join", s.status(),
                 {absl::StatusCode::kOk, absl::StatusCode::kInvalidArgument,
                  absl::StatusCode::kFailedPrecondition});
      break;
    }
    case 1: {
      v1::HeartbeatRequest r;
      if (!r.ParseFromArray(data, n)) return;
      (void)ValidateHeartbeat(r);
      ExpectCode("Heartbeat", core.Heartbeat(r).status(),
                 {absl::StatusCode::kInvalidArgument, absl::StatusCode::kNotFound});
      break;
    }
    case 2: {
      v1::LeaveRequest r;
      if (!r.ParseFromArray(data, n)) return;
      ExpectCode("Leave", core.Leave(r),
                 {absl::StatusCode::kInvalidArgument, absl::StatusCode::kNotFound});
      break;
    }
    case 3: {
      v1::DrainRequest r;
      if (!r.ParseFromArray(data, n)) return;
      ExpectCode("Drain", core.Drain(r.worker_id()).status(),
                 {absl::StatusCode::kInvalidArgument, absl::StatusCode::kNotFound});
      break;
    }
    case 4: {
      v1::WatchAssignmentRequest r;
      if (!r.ParseFromArray(data, n)) return;
      ExpectCode("WaitAssignment",
                 core.WaitAssignment(r.worker_id(), 0, absl::ZeroDuration()).status(),
                 {absl::StatusCode::kNotFound});
      break;
    }
    case 5: {
      v1::PingRequest r;
      if (!r.ParseFromArray(data, n)) return;
      ExpectCode("Ping", ValidatePing(r), {absl::StatusCode::kOk, absl::StatusCode::kInvalidArgument});
      break;
    }
  }
  CheckStatus(core, &version);
}

}  // namespace
}  // namespace shoal::scheduler

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  shoal::SetLogLevel(shoal::LogLevel::kError);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t mode = data[0] % 8;
  if (mode < 6) {
    shoal::scheduler::RunMessage(mode, data + 1, size - 1);
  } else {
    shoal::scheduler::Bytes in(data + 1, size - 1);
    shoal::scheduler::RunProgram(in);
  }
  return 0;
}
