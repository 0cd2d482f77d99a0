#include "runtime/run_report.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/file_util.h"
#include "common/gpt_arithmetic.h"
#include "common/host_allocator.h"
#include "common/logging.h"
#include "common/progress.h"
#include "common/process_memory.h"
#include "memory/model_pager.h"
#include "parallel/adamw.h"
#include "parallel/demo.h"
#include "parallel/mesh.h"
#include "runtime/piece_ops.h"

namespace shoal::runtime {
namespace {

// train.kernels as the run resolves it ("auto" named with what it chose).
std::string KernelsOf(const TrainConfig& t) {
  const absl::StatusOr<Compute> compute = ParseCompute(t.kernels, t.dtype);
  if (!compute.ok() || t.kernels != "auto") return t.kernels;
  return absl::StrCat("auto (", KernelsName(compute->kernels), ")");
}

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// How the step runs, in one line (none for a plain single process).
std::string DescribeEngine(const Config& c, StepEngine& engine, bool layout_from_coordinator,
                           const std::string& backend, int world) {
  const parallel::BatchPlan& batch = engine.batch();
  const int64_t global_batch =
      static_cast<int64_t>(batch.micro_batch_size) * batch.step_micro_batches;
  if (const parallel::Mesh* mesh = engine.mesh()) {
    const parallel::MeshShape& m = mesh->shape();
    const std::string split = layout_from_coordinator     ? "from the coordinator's layout"
                              : c.parallel.stages.empty() ? "even"
                                                          : absl::StrJoin(c.parallel.stages, "/");
    const auto [b0, b1] = engine.stage_blocks();
    return absl::StrCat(
        "mesh ", parallel::ToString(m), " over ", world, " ranks",
        m.pp > 1 ? absl::StrCat(", ", c.parallel.schedule, " pipeline, blocks per stage ", split,
                                " (rank 0: stage ", mesh->coord().pp, ", blocks [", b0, ", ", b1,
                                "))")
                 : "",
        "; ", batch.micro_batches, " micro-batches of ", batch.micro_batch_size,
        " sequences per replica, global batch ", global_batch, " sequences");
  }
  if (const parallel::Demo* d = engine.demo()) {
    if (world == 1) {
      return "optimizer: DeMo on one process (sign of the top-k DCT of the residual, no exchange)";
    }
    Gpt& m = engine.model();
    const double grad_bytes = static_cast<double>(m.grads(Gpt::kDecay).flat().nbytes() +
                                                  m.grads(Gpt::kNoDecay).flat().nbytes());
    return absl::StrFormat(
        "data parallel: %d ranks over %s, DeMo (chunk %d, top-k %d, %s values, decay %g): "
        "payload %s per rank and step, %.1fx less than the %s of fp32 gradients; global batch "
        "%d sequences; replica check every %d steps",
        world, backend, c.optim.demo_chunk, c.optim.demo_topk, c.optim.demo_wire,
        c.optim.demo_decay, FormatBytes(d->PayloadBytes()), grad_bytes / d->PayloadBytes(),
        FormatBytes(grad_bytes), global_batch, c.optim.demo_drift_check);
  }
  if (world > 1) {
    return absl::StrCat("data parallel: ", world, " ranks over ", backend, ", ",
                        c.parallel.zero == 1 ? "ZeRO-1 (sharded optimizer state)"
                                             : "bucketed all-reduce",
                        ", global batch ", global_batch, " sequences");
  }
  return "";
}

}  // namespace

RunReport::RunReport(const Config& config, StepEngine& engine, MetricsFile* metrics,
                     RunReportOptions options)
    : config_(config), engine_(engine), metrics_(metrics), options_(std::move(options)) {
  const parallel::BatchPlan& b = engine.batch();
  replica_tokens_per_step_ =
      static_cast<int64_t>(b.micro_batch_size) * b.micro_batches * config.model.block_size;
  tokens_per_step_ =
      static_cast<int64_t>(b.micro_batch_size) * b.step_micro_batches * config.model.block_size;
  flops_per_token_ = engine.FlopsPerToken();
}

void RunReport::Describe(const ThreadPlan& threads, double throttle, bool layout_from_coordinator,
                         const std::string& backend, const TokenDataset& data) const {
  const Config& c = config_;
  // Every rank: its threads and its throttle.
  if (options_.rank_lines) {
    SHOAL_LOG(Info) << "threads: OpenMP " << threads.omp_threads << ", BLAS "
                    << threads.blas_threads << " (" << threads.reason
                    << "); BLAS: " << DescribeBlas() << "; " << AppliedHostAllocator();
  }
  if (throttle > 1.0) {
    SHOAL_LOG(Info) << "throttle: rank " << options_.rank << " sleeps " << throttle - 1.0
                    << " x its compute time after every step (a deliberately slow device)";
  }
  if (!options_.log) return;
  const parallel::BatchPlan& batch = engine_.batch();
  if (layout_from_coordinator) {
    SHOAL_LOG(Info) << "batch plan from the layout: " << batch.step_micro_batches
                    << " micro-batches of " << batch.micro_batch_size << " sequences per step over "
                    << batch.replicas << " replica(s), shares " << absl::StrJoin(batch.shares, "/");
  }
  SHOAL_LOG(Info) << "model: GPT " << c.model.n_layer << " layers, " << c.model.n_head
                  << " heads, width " << c.model.n_embd << ", context " << c.model.block_size
                  << ", vocab " << c.model.vocab_size << ": " << GptParameters(ShapeOf(c.model))
                  << " parameters; compute " << c.train.dtype << ", kernels " << KernelsOf(c.train);
  SHOAL_LOG(Info) << "data: " << c.data.dir << ": " << data.train->size() << " train / "
                  << data.val->size() << " val tokens";
  const std::string how =
      DescribeEngine(c, engine_, layout_from_coordinator, backend, options_.world);
  if (!how.empty()) SHOAL_LOG(Info) << how;
  if (engine_.mesh() != nullptr && !c.memory.disk_path.empty()) {
    SHOAL_LOG(Warning) << "memory.disk_path: the AdamW moment offload is not available in mesh "
                          "mode yet; the moments stay in RAM";
  }
  if (!engine_.activation_plan().empty()) {
    SHOAL_LOG(Info) << engine_.activation_plan();
  } else if (engine_.mesh() != nullptr && c.memory.activation_budget.set()) {
    SHOAL_LOG(Warning) << "memory.activation_budget: no activation plan in mesh mode yet; every "
                          "block keeps its activations";
  }
  if (c.memory.device_budget.set()) {
    SHOAL_LOG(Warning) << "memory.device_budget = " << c.memory.device_budget.text
                       << ": this trainer runs on the CPU, which has no device tier; the "
                          "budget bounds only what the coordinator plans for this worker";
  }
  const parallel::AdamW* adamw = engine_.adamw();
  if (engine_.pager() != nullptr) {
    SHOAL_LOG(Info) << "memory plan (memory.host_budget " << c.memory.host_budget.text
                    << "): " << engine_.pager()->Describe()
                    << (c.optim.grad_clip <= 0
                            ? "; AdamW steps each chunk inside backward as its gradients are "
                              "final (no clipping)"
                            : "; AdamW steps after backward (clipping needs every gradient)");
  } else if (adamw != nullptr && adamw->moment_store() != nullptr) {
    const memory::TieredChunkStore& store = *adamw->moment_store();
    SHOAL_LOG(Info) << absl::StrFormat(
        "optimizer moments: %s in %d chunks of %s; %s of them in RAM (memory.host_budget %s "
        "less parameters and gradients), the rest on disk under %s",
        FormatBytes(static_cast<double>(store.num_chunks()) * store.chunk_bytes()),
        store.num_chunks(), FormatBytes(store.chunk_bytes()),
        FormatBytes(store.host_budget_bytes()), c.memory.host_budget.text, c.memory.disk_path);
  }
}

void RunReport::Resumed(const std::string& root, int64_t step) const {
  if (options_.log) SHOAL_LOG(Info) << "resumed from " << root << " at step " << step;
}

void RunReport::Start(int64_t start_step, double peak_gflops) {
  start_step_ = start_step;
  peak_gflops_ = peak_gflops;
  run_start_ = interval_start_ = Clock::now();
}

void RunReport::Step(int64_t done, int64_t end_step, const StepStats& stats, double seconds) {
  const parallel::PipelineStepTiming pt = engine_.pipeline_timing();
  pipeline_total_.compute_s += pt.compute_s;
  pipeline_total_.recv_wait_s += pt.recv_wait_s;
  pipeline_total_.send_wait_s += pt.send_wait_s;
  pipeline_total_.total_s += pt.total_s;
  interval_seconds_ += seconds;
  interval_loss_ += stats.loss;
  ++interval_steps_;
  if (!options_.bench || done - 1 - start_step_ >= options_.bench_warmup_steps) {
    timed_seconds_ += seconds;
    ++timed_steps_;
  }
  const int64_t on_disk = engine_.StateBytesOnDisk();  // for the coordinator and the metrics
  if (options_.on_step) {
    StepReport report{done, stats.loss, stats.lr,
                      seconds > 0 ? static_cast<double>(replica_tokens_per_step_) / seconds : 0.0,
                      seconds, on_disk};
    if (const std::optional<MemoryPlanFigures> plan = engine_.MemoryPlan()) {
      report.predicted_step_seconds = plan->predicted_step_seconds;
      report.predicted_peak_host_bytes = plan->predicted_peak_host_bytes;
      report.host_budget_bytes = plan->host_budget_bytes;
      report.state_bytes = plan->state_bytes;
    }
    options_.on_step(report);
  }
  if (done % config_.train.log_every != 0 && done != end_step) return;
  TrainLogRecord r;
  r.step = done;
  r.total_steps = config_.train.steps;
  r.loss = interval_loss_ / interval_steps_;
  r.lr = stats.lr;
  r.grad_norm = stats.grad_norm;
  r.tokens_per_s = tokens_per_step_ * interval_steps_ / interval_seconds_;
  r.mfu = r.tokens_per_s * flops_per_token_ / (peak_gflops_ * 1e9 * options_.nodes);
  r.elapsed_s = Seconds(run_start_, Clock::now());
  r.eta_s = Seconds(interval_start_, Clock::now()) / interval_steps_ * (config_.train.steps - done);
  // The exchange's bytes are counted for data parallelism (all-reduce or DeMo); a mesh's
  // pipeline and tensor-parallel traffic is not (-1), so nothing is shown there.
  const bool counted = stats.bytes_sent >= 0;
  if (options_.world > 1 && counted) {
    r.bytes_sent = stats.bytes_sent;
    r.bytes_received = stats.bytes_received;
  }
  if (options_.log) SHOAL_LOG(Info) << FormatTrainLine(r);
  if (metrics_ != nullptr) {
    nlohmann::json record = {{"kind", "train"},         {"step", done},
                             {"loss", r.loss},          {"lr", r.lr},
                             {"grad_norm", r.grad_norm}, {"tokens_per_s", r.tokens_per_s},
                             {"mfu", r.mfu},            {"elapsed_s", r.elapsed_s},
                             {"eta_s", r.eta_s},        {"step_loss", stats.loss}};
    if (on_disk > 0) record["state_bytes_on_disk"] = on_disk;
    if (counted) {
      record["bytes_sent"] = stats.bytes_sent;
      record["bytes_received"] = stats.bytes_received;
    }
    metrics_->Write(record);
  }
  interval_start_ = Clock::now();
  interval_seconds_ = interval_loss_ = 0;
  interval_steps_ = 0;
}

void RunReport::Validation(int64_t step, double loss) const {
  if (options_.log) SHOAL_LOG(Info) << "step " << step << " | val loss " << loss;
  if (metrics_ != nullptr) metrics_->Write({{"kind", "val"}, {"step", step}, {"val_loss", loss}});
}

void RunReport::Checkpointed(const std::string& path) const {
  if (options_.log) SHOAL_LOG(Info) << "checkpoint: " << path;
}

void RunReport::StopRequested(int64_t step) const {
  if (options_.log) {
    SHOAL_LOG(Warning) << "stop requested: checkpointing at step " << step << " and exiting";
  }
}

RunTiming RunReport::Finish(int64_t step) {
  const parallel::Mesh* mesh = engine_.mesh();
  if (mesh != nullptr && pipeline_total_.total_s > 0 && options_.log_all_ranks_summary) {
    // Every rank: where its pipeline time went (a stage that mostly waits is under-loaded).
    const auto [b0, b1] = engine_.stage_blocks();
    const parallel::MeshCoord& mc = mesh->coord();
    const parallel::PipelineStepTiming& p = pipeline_total_;
    SHOAL_LOG(Info) << absl::StrFormat(
        "rank %d (stage %d, blocks [%d, %d), tp rank %d): computing %.1f%%, waiting for "
        "neighbours %.1f%%, finishing sends %.1f%% of %.2f s in the pipeline",
        options_.rank, mc.pp, b0, b1, mc.tp, 100 * p.compute_s / p.total_s,
        100 * p.recv_wait_s / p.total_s, 100 * p.send_wait_s / p.total_s, p.total_s);
  }
  const parallel::AdamW* adamw = engine_.adamw();
  if (adamw != nullptr && adamw->moment_store() != nullptr && options_.log) {
    const memory::TieredChunkStore& store = *adamw->moment_store();
    const memory::TieredChunkStoreStats st = store.stats();
    SHOAL_LOG(Info) << absl::StrFormat(
        "optimizer moments offloaded: %d chunks of %d bytes, at most %d in RAM (peak %d of %d "
        "bytes); %d loads and %d write-backs, %d bytes read and %d written, %.2f s waited",
        store.num_chunks(), store.chunk_bytes(), store.capacity_chunks(), st.peak_resident_bytes,
        store.host_budget_bytes(), st.loads, st.write_backs, st.bytes_read, st.bytes_written,
        st.acquire_wait_seconds);
  }
  if (const memory::ModelPager* pager = engine_.pager(); pager != nullptr && options_.log) {
    const memory::TieredChunkStoreStats st = pager->store().stats();
    SHOAL_LOG(Info) << absl::StrFormat(
        "paged parameters and gradients: %d chunks of %d bytes, peak %d of %d bytes in RAM; %d "
        "loads (%d prefetched, %d hits), %d write-backs, %d bytes read and %d written, %.2f s "
        "waited; loads and zero fills per step after the warm-up %.1f (the trace predicted %d)",
        pager->store().num_chunks(), pager->store().chunk_bytes(), st.peak_resident_bytes,
        pager->store().host_budget_bytes(), st.loads, st.prefetches, st.prefetch_hits,
        st.write_backs, st.bytes_read, st.bytes_written, st.acquire_wait_seconds,
        pager->measured_loads_per_step(), pager->predicted_loads_per_step());
    if (pager->plan().has_value()) {
      // The plan's predictions against what the run did.
      SHOAL_LOG(Info) << absl::StrFormat(
          "memory plan: predicted %.3f s per step, measured %.3f s (mean after the warm-up); "
          "predicted peak %.1f MiB, measured peak RSS %.1f MiB",
          pager->plan()->step_seconds, pager->measured_step_seconds(),
          pager->plan()->peak_bytes / double(1 << 20), PeakResidentBytes() / double(1 << 20));
    }
  }
  if (engine_.demo() != nullptr && options_.world > 1 && options_.log_all_ranks_summary) {
    // Every rank: a fingerprint of its parameters, so a reader (or a test) can see that the
    // replicas ended identical without trusting the in-run check.
    SHOAL_LOG(Info) << absl::StrFormat(
        "rank %d: DeMo replica parameters hash %016x after step %d", options_.rank,
        engine_.ParameterHash(), step);
  }
  RunTiming t;
  if (timed_steps_ > 0) {
    t.step_time_ms = 1e3 * timed_seconds_ / timed_steps_;
    t.tokens_per_s = tokens_per_step_ * timed_steps_ / timed_seconds_;
    t.mfu = t.tokens_per_s * flops_per_token_ / (peak_gflops_ * 1e9 * options_.nodes);
  }
  return t;
}

}  // namespace shoal::runtime
