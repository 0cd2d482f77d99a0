// A cluster status snapshot built by hand for the HTTP, Prometheus and dashboard tests: five
// workers on three hosts (two H100s, an A100, a CPU host alive; a CPU host dead), a
// 1 (tp) x 2 (pp) x 2 (dp) layout with uneven stages, and a loss history from a closed form.
// The numbers are chosen, not computed by shoal, so tests can state what to expect.
#ifndef SHOAL_TESTS_SCHEDULER_SAMPLE_STATUS_H_
#define SHOAL_TESTS_SCHEDULER_SAMPLE_STATUS_H_

#include <cmath>
#include <string>
#include <vector>

#include "proto/coordinator.pb.h"

namespace shoal::testing {

// The closed form of the sample's loss history: a decaying exponential with a small ripple.
inline double SampleLoss(int64_t step) {
  return 2.1 + 8.8 * std::exp(-static_cast<double>(step) / 260.0) +
         0.04 * std::sin(static_cast<double>(step) / 17.0);
}

inline constexpr int kSampleHistoryPoints = 120;  // steps 10, 20, ..., 1200
inline constexpr int64_t kSampleStep = 1200;
inline constexpr int64_t kSampleNowMs = 1764200000000;  // 2025-11-26 23:33:20 UTC

struct SampleStage {
  int replica, stage, first_layer, end_layer;
  const char* worker;
};
// The layout's stages as the tests expect to see them drawn.
inline const std::vector<SampleStage>& SampleStages() {
  static const std::vector<SampleStage> stages = {
      {0, 0, 0, 8, "rank0"}, {0, 1, 8, 12, "rank2"},
      {1, 0, 0, 6, "rank1"}, {1, 1, 6, 12, "rank3"}};
  return stages;
}

inline v1::ClusterStatus SampleClusterStatus() {
  v1::ClusterStatus s;
  s.set_protocol_version(1);
  s.set_coordinator_version("0.1.0-test");
  s.set_now_unix_ms(kSampleNowMs);
  s.set_started_unix_ms(kSampleNowMs - 3'600'000);
  s.set_health("degraded");

  auto* job = s.mutable_job();
  job->set_name("gpt2-small-demo");
  job->set_global_batch(64);
  auto* model = job->mutable_model();
  model->set_n_layer(12);
  model->set_n_head(12);
  model->set_n_embd(768);
  model->set_block_size(1024);
  model->set_vocab_size(50304);
  model->set_param_bytes(4);
  model->set_grad_bytes(4);
  model->set_optimizer_bytes(8);

  struct W {
    const char* id;
    const char* host;
    v1::DeviceKind kind;
    const char* name;
    double gflops;
    int64_t gpu_bytes, host_bytes;
    v1::WorkerState state;
    double tokens_per_s;
    int64_t heartbeat_age_ms;
    int replica, stage, first, end;
  };
  constexpr int64_t GiB = int64_t{1} << 30;
  const W workers[] = {
      {"rank0", "gpu-node-a", v1::DEVICE_KIND_CUDA, "NVIDIA H100 80GB HBM3", 51000, 80 * GiB,
       256 * GiB, v1::WORKER_STATE_ALIVE, 41000, 800, 0, 0, 0, 8},
      {"rank1", "gpu-node-a", v1::DEVICE_KIND_CUDA, "NVIDIA A100-SXM4-40GB", 19500, 40 * GiB,
       256 * GiB, v1::WORKER_STATE_ALIVE, 26500, 1300, 1, 0, 0, 6},
      {"rank2", "cpu-node-b", v1::DEVICE_KIND_CPU, "Intel Xeon Platinum 8480+ (56 cores)", 3900,
       0, 512 * GiB, v1::WORKER_STATE_ALIVE, 9800, 2100, 0, 1, 8, 12},
      {"rank3", "gpu-node-c", v1::DEVICE_KIND_CUDA, "NVIDIA H100 80GB HBM3", 50500, 80 * GiB,
       128 * GiB, v1::WORKER_STATE_ALIVE, 25900, 400, 1, 1, 6, 12},
      {"rank4", "cpu-node-d", v1::DEVICE_KIND_CPU, "AMD EPYC 7763 (64 cores)", 2600, 0,
       256 * GiB, v1::WORKER_STATE_DEAD, 0, 47000, -1, -1, 0, 0},
  };
  int rank = 0;
  for (const W& w : workers) {
    auto* ws = s.add_workers();
    ws->set_worker_id(w.id);
    ws->set_mesh_rank(rank++);
    ws->set_state(w.state);
    auto* d = ws->mutable_device();
    d->set_host(w.host);
    d->set_kind(w.kind);
    d->set_device_name(w.name);
    d->set_fp32_gflops(w.gflops);
    d->mutable_memory()->set_gpu_bytes(w.gpu_bytes);
    d->mutable_memory()->set_host_bytes(w.host_bytes);
    d->mutable_memory()->set_disk_bytes(1024 * GiB);
    d->set_shoal_version("0.1.0-test");
    d->set_cores(w.kind == v1::DEVICE_KIND_CPU ? 56 : 8);
    ws->set_joined_unix_ms(kSampleNowMs - 3'000'000);
    ws->set_last_heartbeat_unix_ms(kSampleNowMs - w.heartbeat_age_ms);
    auto* st = ws->mutable_last_stats();
    st->set_step(w.state == v1::WORKER_STATE_ALIVE ? kSampleStep : 950);
    st->set_loss(SampleLoss(st->step()));
    st->set_tokens_per_s(w.tokens_per_s);
    st->set_step_time_s(w.tokens_per_s > 0 ? 32 * 1024 / w.tokens_per_s : 0);
    st->mutable_memory_used()->set_gpu_bytes(w.gpu_bytes / 2);
    st->mutable_memory_used()->set_host_bytes(3 * GiB);
    if (w.kind == v1::DEVICE_KIND_CPU && w.state == v1::WORKER_STATE_ALIVE) {
      // A CPU worker paging its states: its chunk manager's own plan.
      st->set_predicted_step_s(3.25);
      auto* plan = st->mutable_memory_plan();
      auto* paged = plan->add_states();
      paged->set_state("paged_states");
      paged->mutable_bytes()->set_host_bytes(6 * GiB);
      paged->mutable_bytes()->set_disk_bytes(18 * GiB);
      plan->mutable_peak()->set_host_bytes(9 * GiB);
      plan->mutable_peak()->set_disk_bytes(24 * GiB);
      plan->mutable_budget()->set_host_bytes(6 * GiB);
    }
    auto* a = ws->mutable_assignment();
    a->set_version(3);
    a->set_worker_id(w.id);
    a->set_placed(w.replica >= 0);
    if (w.replica >= 0) {
      a->set_tp(1);
      a->set_pp(2);
      a->set_dp(2);
      a->set_replica(w.replica);
      a->set_stage(w.stage);
      a->set_first_layer(w.first);
      a->set_end_layer(w.end);
      a->set_has_embedding(w.stage == 0);
      a->set_has_head(w.stage == 1);
    } else {
      a->set_reason("lease expired");
    }
  }

  auto* layout = s.mutable_layout();
  layout->set_version(3);
  layout->set_tp(1);
  layout->set_pp(2);
  layout->set_dp(2);
  layout->set_micro_batch_size(4);
  layout->set_predicted_step_s(1.62);
  layout->set_predicted_tokens_per_s(40450);
  layout->set_summary("tp1 x pp2 x dp2 over 4 devices: 12 blocks split 8+4 and 6+6");
  for (int r = 0; r < 2; ++r) {
    auto* p = layout->add_pipelines();
    p->set_replica(r);
    p->set_micro_batches(r == 0 ? 9 : 7);
    p->set_predicted_time_s(r == 0 ? 1.62 : 1.58);
  }
  for (const SampleStage& st : SampleStages()) {
    auto* stage = layout->mutable_pipelines(st.replica)->add_stages();
    stage->set_index(st.stage);
    stage->set_first_layer(st.first_layer);
    stage->set_end_layer(st.end_layer);
    stage->set_has_embedding(st.stage == 0);
    stage->set_has_head(st.stage == 1);
    stage->add_workers(st.worker);
    stage->set_predicted_time_s(0.8);
    auto* placement = layout->add_placements();
    placement->set_worker_id(st.worker);
    placement->set_replica(st.replica);
    placement->set_stage(st.stage);
  }
  layout->add_unused_workers("rank4");

  auto* js = s.mutable_job_status();
  js->set_step(kSampleStep);
  js->set_loss(SampleLoss(kSampleStep));
  js->set_tokens_per_s(36400);
  for (int i = 1; i <= kSampleHistoryPoints; ++i) {
    auto* point = js->add_history();
    point->set_step(10 * i);
    point->set_loss(SampleLoss(10 * i));
    // Warm-up to about 36k tokens/s with a small ripple.
    point->set_tokens_per_s(36400 * (1 - 0.6 * std::exp(-i / 10.0)) + 300 * std::sin(i / 3.0));
    point->set_unix_ms(kSampleNowMs - (kSampleHistoryPoints - i) * 15000);
  }

  auto* c = s.mutable_counters();
  c->set_joins_total(6);
  c->set_leaves_total(1);
  c->set_heartbeats_total(98765);
  c->set_expirations_total(1);
  c->set_layouts_total(3);
  c->set_rejected_requests_total(2);
  return s;
}

}  // namespace shoal::testing

#endif  // SHOAL_TESTS_SCHEDULER_SAMPLE_STATUS_H_
