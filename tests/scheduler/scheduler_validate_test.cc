// Request validation: every bad field gives kInvalidArgument whose message contains the field's
// path; a wrong protocol version kFailedPrecondition naming both versions; good requests pass.
#include "scheduler/validate.h"

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"

namespace shoal::scheduler {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
const double kNaN = std::nan("");

v1::JoinRequest GoodJoin() {
  v1::JoinRequest r;
  r.set_protocol_version(kProtocolVersion);
  v1::DeviceProfile* d = r.mutable_device();
  d->set_host("node-1.example");
  d->set_kind(v1::DEVICE_KIND_CUDA);
  d->set_device_name("NVIDIA H100 80GB HBM3");
  d->mutable_memory()->set_gpu_bytes(int64_t{80} << 30);
  d->mutable_memory()->set_host_bytes(int64_t{200} << 30);
  d->mutable_memory()->set_disk_bytes(int64_t{2} << 40);
  d->set_fp32_gflops(51000);
  d->set_bf16_gflops(750000);
  d->set_h2d_gbps(50);
  d->set_d2h_gbps(50);
  d->set_host_copy_gbps(20);
  d->set_net_gbps(50);
  d->set_rtt_ms(0.2);
  d->set_shoal_version("0.1.0");
  d->set_cores(16);
  d->set_throttle(1);
  v1::JobSpec* j = r.mutable_job();
  j->set_name("gpt2-small");
  v1::ModelSpec* m = j->mutable_model();
  m->set_n_layer(12);
  m->set_n_head(12);
  m->set_n_embd(768);
  m->set_block_size(1024);
  m->set_vocab_size(50304);
  m->set_param_bytes(4);
  m->set_grad_bytes(4);
  m->set_optimizer_bytes(8);
  j->set_global_batch(512);
  j->set_expected_workers(8);
  r.set_mesh_rank(3);
  r.set_name("worker-3");
  return r;
}

v1::HeartbeatRequest GoodBeat() {
  v1::HeartbeatRequest r;
  r.set_worker_id("rank3");
  v1::StepStats* s = r.mutable_stats();
  s->set_step(100);
  s->set_loss(3.2);
  s->set_tokens_per_s(12000);
  s->set_step_time_s(0.8);
  s->set_lr(6e-4);
  s->mutable_memory_used()->set_host_bytes(int64_t{4} << 30);
  return r;
}

void ExpectInvalid(const absl::Status& s, const std::string& field) {
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << field << ": " << s;
  EXPECT_NE(s.message().find(field), std::string::npos) << "expected '" << field << "' in: " << s;
}

TEST(ValidateTest, GoodRequestsPass) {
  EXPECT_TRUE(ValidateJoin(GoodJoin()).ok()) << ValidateJoin(GoodJoin());
  EXPECT_TRUE(ValidateHeartbeat(GoodBeat()).ok());
  v1::LeaveRequest leave;
  leave.set_worker_id("w12");
  leave.set_reason("preempted by the scheduler");
  EXPECT_TRUE(ValidateLeave(leave).ok());
  v1::PingRequest ping;
  ping.set_payload(std::string(4 << 20, 'p'));  // exactly the limit
  EXPECT_TRUE(ValidatePing(ping).ok());
  // A CPU host, no name, a swarm worker, an unset throttle, a heartbeat without stats.
  v1::JoinRequest cpu = GoodJoin();
  cpu.mutable_device()->set_kind(v1::DEVICE_KIND_CPU);
  cpu.mutable_device()->mutable_memory()->set_gpu_bytes(0);
  cpu.mutable_device()->set_bf16_gflops(0);
  cpu.mutable_device()->set_throttle(0);
  cpu.set_name("");
  cpu.set_mesh_rank(-1);
  EXPECT_TRUE(ValidateJoin(cpu).ok()) << ValidateJoin(cpu);
  v1::HeartbeatRequest bare;
  bare.set_worker_id("w0");
  EXPECT_TRUE(ValidateHeartbeat(bare).ok());
}

TEST(ValidateTest, WrongProtocolVersionNamesBoth) {
  for (uint32_t v : {0u, kProtocolVersion + 1, 4000000000u}) {
    v1::JoinRequest r = GoodJoin();
    r.set_protocol_version(v);
    const absl::Status s = ValidateJoin(r);
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_NE(s.message().find(absl::StrCat("version ", v)), std::string::npos) << s;
    EXPECT_NE(s.message().find(absl::StrCat("version ", kProtocolVersion)), std::string::npos)
        << s;
  }
}

struct JoinCase {
  std::string field;
  std::function<void(v1::JoinRequest*)> mutate;
};

TEST(ValidateTest, EachBadJoinFieldIsNamed) {
  auto dev = [](v1::JoinRequest* r) { return r->mutable_device(); };
  auto model = [](v1::JoinRequest* r) { return r->mutable_job()->mutable_model(); };
  const std::vector<JoinCase> cases = {
      {"device", [](v1::JoinRequest* r) { r->clear_device(); }},
      {"device.host", [&](v1::JoinRequest* r) { dev(r)->set_host(""); }},
      {"device.host", [&](v1::JoinRequest* r) { dev(r)->set_host(std::string(257, 'h')); }},
      {"device.host", [&](v1::JoinRequest* r) { dev(r)->set_host("node\n1"); }},
      {"device.kind", [&](v1::JoinRequest* r) { dev(r)->set_kind(v1::DEVICE_KIND_UNSPECIFIED); }},
      {"device.kind", [&](v1::JoinRequest* r) { dev(r)->set_kind(static_cast<v1::DeviceKind>(7)); }},
      {"device.device_name",
       [&](v1::JoinRequest* r) { dev(r)->set_device_name(std::string(300, 'd')); }},
      {"device.memory.host_bytes",
       [&](v1::JoinRequest* r) { dev(r)->mutable_memory()->set_host_bytes(-1); }},
      {"device.memory.gpu_bytes",
       [&](v1::JoinRequest* r) { dev(r)->mutable_memory()->set_gpu_bytes(-(int64_t{1} << 40)); }},
      {"device.memory.disk_bytes",
       [&](v1::JoinRequest* r) { dev(r)->mutable_memory()->set_disk_bytes(int64_t{1} << 51); }},
      {"device.memory.gpu_bytes",
       [&](v1::JoinRequest* r) { dev(r)->set_kind(v1::DEVICE_KIND_CPU); }},
      {"device.memory",
       [&](v1::JoinRequest* r) {
         dev(r)->mutable_memory()->set_gpu_bytes(0);
         dev(r)->mutable_memory()->set_host_bytes(0);
       }},
      {"device.fp32_gflops", [&](v1::JoinRequest* r) { dev(r)->set_fp32_gflops(kNaN); }},
      {"device.fp32_gflops", [&](v1::JoinRequest* r) { dev(r)->set_fp32_gflops(kInf); }},
      {"device.fp32_gflops", [&](v1::JoinRequest* r) { dev(r)->set_fp32_gflops(0); }},
      {"device.fp32_gflops", [&](v1::JoinRequest* r) { dev(r)->set_fp32_gflops(-5); }},
      {"device.fp32_gflops", [&](v1::JoinRequest* r) { dev(r)->set_fp32_gflops(2e7); }},
      {"device.bf16_gflops", [&](v1::JoinRequest* r) { dev(r)->set_bf16_gflops(1e12); }},
      {"device.bf16_gflops", [&](v1::JoinRequest* r) { dev(r)->set_bf16_gflops(-kInf); }},
      {"device.peak_gflops", [&](v1::JoinRequest* r) { dev(r)->set_peak_gflops(-1); }},
      {"device.peak_gflops", [&](v1::JoinRequest* r) { dev(r)->set_peak_gflops(kInf); }},
      {"device.h2d_gbps", [&](v1::JoinRequest* r) { dev(r)->set_h2d_gbps(-1); }},
      {"device.d2h_gbps", [&](v1::JoinRequest* r) { dev(r)->set_d2h_gbps(kNaN); }},
      {"device.host_copy_gbps", [&](v1::JoinRequest* r) { dev(r)->set_host_copy_gbps(1e5); }},
      {"device.net_gbps", [&](v1::JoinRequest* r) { dev(r)->set_net_gbps(kInf); }},
      {"device.rtt_ms", [&](v1::JoinRequest* r) { dev(r)->set_rtt_ms(-0.1); }},
      {"device.shoal_version",
       [&](v1::JoinRequest* r) { dev(r)->set_shoal_version(std::string("0.1\x7f", 4)); }},
      {"device.cores", [&](v1::JoinRequest* r) { dev(r)->set_cores(-1); }},
      {"device.throttle", [&](v1::JoinRequest* r) { dev(r)->set_throttle(0.5); }},
      {"device.throttle", [&](v1::JoinRequest* r) { dev(r)->set_throttle(kNaN); }},
      {"job", [](v1::JoinRequest* r) { r->clear_job(); }},
      {"job.name", [](v1::JoinRequest* r) { r->mutable_job()->set_name(std::string(1000, 'n')); }},
      {"job.model", [](v1::JoinRequest* r) { r->mutable_job()->clear_model(); }},
      {"job.model.n_layer", [&](v1::JoinRequest* r) { model(r)->set_n_layer(0); }},
      {"job.model.n_layer", [&](v1::JoinRequest* r) { model(r)->set_n_layer(200000); }},
      {"job.model.n_head", [&](v1::JoinRequest* r) { model(r)->set_n_head(-12); }},
      {"job.model.n_embd", [&](v1::JoinRequest* r) { model(r)->set_n_embd(0); }},
      {"job.model.n_embd", [&](v1::JoinRequest* r) { model(r)->set_n_embd(770); }},  // % 12
      {"job.model.block_size", [&](v1::JoinRequest* r) { model(r)->set_block_size(0); }},
      {"job.model.vocab_size", [&](v1::JoinRequest* r) { model(r)->set_vocab_size(1 << 25); }},
      {"job.model.param_bytes", [&](v1::JoinRequest* r) { model(r)->set_param_bytes(0); }},
      {"job.model.param_bytes", [&](v1::JoinRequest* r) { model(r)->set_param_bytes(kInf); }},
      {"job.model.grad_bytes", [&](v1::JoinRequest* r) { model(r)->set_grad_bytes(-4); }},
      {"job.model.optimizer_bytes", [&](v1::JoinRequest* r) { model(r)->set_optimizer_bytes(kNaN); }},
      {"job.global_batch", [](v1::JoinRequest* r) { r->mutable_job()->set_global_batch(0); }},
      {"job.global_batch", [](v1::JoinRequest* r) { r->mutable_job()->set_global_batch(-8); }},
      {"job.expected_workers",
       [](v1::JoinRequest* r) { r->mutable_job()->set_expected_workers(-1); }},
      {"job.max_tp", [](v1::JoinRequest* r) { r->mutable_job()->set_max_tp(-1); }},
      {"job.max_pp", [](v1::JoinRequest* r) { r->mutable_job()->set_max_pp(-1); }},
      {"job.max_micro_batch", [](v1::JoinRequest* r) { r->mutable_job()->set_max_micro_batch(-1); }},
      {"mesh_rank", [](v1::JoinRequest* r) { r->set_mesh_rank(-2); }},
      {"name", [](v1::JoinRequest* r) { r->set_name("has space"); }},
      {"name", [](v1::JoinRequest* r) { r->set_name("../etc/passwd"); }},
      {"name", [](v1::JoinRequest* r) { r->set_name(std::string(257, 'a')); }},
  };
  for (const JoinCase& c : cases) {
    v1::JoinRequest r = GoodJoin();
    c.mutate(&r);
    ExpectInvalid(ValidateJoin(r), c.field);
  }
}

TEST(ValidateTest, EachBadHeartbeatFieldIsNamed) {
  const std::vector<std::pair<std::string, std::function<void(v1::HeartbeatRequest*)>>> cases = {
      {"worker_id", [](v1::HeartbeatRequest* r) { r->set_worker_id(""); }},
      {"worker_id", [](v1::HeartbeatRequest* r) { r->set_worker_id("a b"); }},
      {"worker_id", [](v1::HeartbeatRequest* r) { r->set_worker_id(std::string(300, 'w')); }},
      {"worker_id", [](v1::HeartbeatRequest* r) { r->set_worker_id(std::string("w\0", 2)); }},
      {"stats.step", [](v1::HeartbeatRequest* r) { r->mutable_stats()->set_step(-1); }},
      {"stats.loss", [](v1::HeartbeatRequest* r) { r->mutable_stats()->set_loss(kNaN); }},
      {"stats.loss", [](v1::HeartbeatRequest* r) { r->mutable_stats()->set_loss(-kInf); }},
      {"stats.tokens_per_s",
       [](v1::HeartbeatRequest* r) { r->mutable_stats()->set_tokens_per_s(-1); }},
      {"stats.step_time_s",
       [](v1::HeartbeatRequest* r) { r->mutable_stats()->set_step_time_s(kInf); }},
      {"stats.lr", [](v1::HeartbeatRequest* r) { r->mutable_stats()->set_lr(kNaN); }},
      {"stats.memory_used.host_bytes",
       [](v1::HeartbeatRequest* r) { r->mutable_stats()->mutable_memory_used()->set_host_bytes(-1); }},
      {"stats.predicted_step_s",
       [](v1::HeartbeatRequest* r) { r->mutable_stats()->set_predicted_step_s(kNaN); }},
      {"stats.memory_plan.peak.host_bytes",
       [](v1::HeartbeatRequest* r) {
         r->mutable_stats()->mutable_memory_plan()->mutable_peak()->set_host_bytes(-5);
       }},
      {"stats.memory_plan.states[0].state",
       [](v1::HeartbeatRequest* r) {
         r->mutable_stats()->mutable_memory_plan()->add_states()->set_state(std::string("a\x01", 2));
       }},
      {"stats.memory_plan.states[0].bytes.disk_bytes",
       [](v1::HeartbeatRequest* r) {
         auto* st = r->mutable_stats()->mutable_memory_plan()->add_states();
         st->set_state("paged_states");
         st->mutable_bytes()->set_disk_bytes(-1);
       }},
      {"stats.memory_plan.states",
       [](v1::HeartbeatRequest* r) {
         for (int i = 0; i < 17; ++i) {
           r->mutable_stats()->mutable_memory_plan()->add_states()->set_state("s");
         }
       }},
  };
  for (const auto& [field, mutate] : cases) {
    v1::HeartbeatRequest r = GoodBeat();
    mutate(&r);
    ExpectInvalid(ValidateHeartbeat(r), field);
  }
}

TEST(ValidateTest, LeavePingAndIds) {
  v1::LeaveRequest leave;
  ExpectInvalid(ValidateLeave(leave), "worker_id");
  leave.set_worker_id("w1");
  leave.set_reason(std::string(257, 'r'));
  ExpectInvalid(ValidateLeave(leave), "reason");
  v1::PingRequest ping;
  ping.set_payload(std::string((4 << 20) + 1, 'p'));
  ExpectInvalid(ValidatePing(ping), "payload");
  ExpectInvalid(ValidateWorkerId("x/y", "drain.worker_id"), "drain.worker_id");
  EXPECT_TRUE(ValidateWorkerId("rank-0_a.b:c@d", "worker_id").ok());
}

TEST(ValidateTest, LimitsAreConfigurable) {
  ValidationLimits tight;
  tight.max_gflops = 1000;
  tight.max_ping_payload_bytes = 10;
  ExpectInvalid(ValidateJoin(GoodJoin(), tight), "device.fp32_gflops");
  v1::PingRequest ping;
  ping.set_payload("01234567890");
  ExpectInvalid(ValidatePing(ping, tight), "payload");
}

}  // namespace
}  // namespace shoal::scheduler
