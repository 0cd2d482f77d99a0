#include "runtime/trainer.h"

#include <ATen/ATen.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <tuple>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/file_util.h"
#include "common/logging.h"
#include "common/process_memory.h"
#include "common/progress.h"
#include "common/status.h"
#include "runtime/activation_offload.h"
#include "runtime/device_probe.h"
#include "runtime/lr_schedule.h"
#include "runtime/model_pager.h"
#include "runtime/model_state.h"
#include "runtime/profiler.h"

namespace shoal::runtime {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Runs `fn`, turning a LibTorch exception into a status at the edge of runtime/.
template <typename Fn>
absl::Status CatchTorch(const char* what, Fn&& fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat(what, ": ", e.what_without_backtrace()));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(what, ": ", e.what()));
  }
  return absl::OkStatus();
}

constexpr char kDemoDeltaPrefix[] = "demo.delta.";

int64_t DiskBudgetBytes(const Config& config) {
  if (config.memory.disk_budget.empty()) return 0;
  const absl::StatusOr<int64_t> disk = ParseByteSize(config.memory.disk_budget, "memory.disk_budget");
  TORCH_CHECK(disk.ok(), disk.status().ToString());
  return *disk;
}

// The AdamW moment chunks that fit next to the parameters and gradients when both are in RAM.
int64_t MomentChunkElements(int64_t elements) {
  // About 32 chunks of moments: fine enough that a small budget still holds several of them.
  return std::clamp<int64_t>((elements / 32 + 15) / 16 * 16, 4096, int64_t{1} << 20);
}

// Elements of the decay group (2-D weights and embeddings) and of the rest, from the config.
std::pair<int64_t, int64_t> GroupElements(const ModelConfig& m) {
  const int64_t c = m.n_embd;
  const int64_t decay = static_cast<int64_t>(m.vocab_size) * c +
                        static_cast<int64_t>(m.block_size) * c + m.n_layer * 12 * c * c;
  return {decay, m.n_layer * 13 * c + 2 * c};
}

// Which offload memory.host_budget and memory.disk_path ask for (issue 7), from the model's
// size: none when no disk_path is set or all states (16 bytes per parameter) fit; the AdamW
// moments alone when the parameters and gradients fit with two chunks of moments; otherwise
// everything paged (ModelPager), which needs one process. Throws c10::Error naming the budget
// when paging is needed but not available.
std::unique_ptr<ModelPager> PagerFor(const Config& config, int world, int worker) {
  if (config.memory.disk_path.empty() || config.memory.host_budget.empty()) return nullptr;
  const absl::StatusOr<int64_t> host = ParseByteSize(config.memory.host_budget, "memory.host_budget");
  TORCH_CHECK(host.ok(), host.status().ToString());
  const auto [decay, rest] = GroupElements(config.model);
  const int64_t elements = decay + rest;
  if (*host >= 16 * elements) return nullptr;
  if (*host >= 8 * elements + 2 * 8 * MomentChunkElements(elements)) return nullptr;
  TORCH_CHECK(world == 1 && config.optim.name == "adamw",
              "memory.host_budget = ", config.memory.host_budget, " (", *host, " bytes) cannot "
              "hold the parameters and gradients (", 8 * elements, " bytes): paging them to "
              "memory.disk_path needs one process with AdamW for now (", world, " ranks, optim ",
              config.optim.name, ")");
  ModelPagerOptions o;
  // The rest (biases and norm gains, a few per mille of the model) stays in RAM with its
  // gradients; its moments share the optimizer's store with the decay group's.
  o.budget_bytes = *host - 8 * (rest + 64);
  o.disk_directory = config.memory.disk_path;
  o.disk_budget_bytes = DiskBudgetBytes(config);
  o.worker = worker;
  return std::make_unique<ModelPager>(o);
}

// The AdamW moment offload that memory.host_budget and memory.disk_path ask for: parameters and
// gradients stay in RAM, the moments get what is left of the budget, and the rest of them goes to
// a disk tier under disk_path. Off (host_budget_bytes 0) when no disk_path is set or everything
// fits. Throws c10::Error when the budget cannot hold the parameters, gradients and two chunks of
// moments. With a pager, the moments follow its chunks and get its share of the budget.
parallel::MomentOffload MomentOffloadFor(const Config& config, Gpt& model, int worker,
                                         ModelPager* pager) {
  parallel::MomentOffload o;
  if (pager != nullptr) {
    o.chunk_elements = pager->chunk_elements();
    o.host_budget_bytes = pager->moment_budget_bytes();
    o.disk_directory = config.memory.disk_path;
    o.disk_budget_bytes = DiskBudgetBytes(config);
    o.worker = worker;
    o.residency = pager;
    return o;
  }
  if (config.memory.disk_path.empty() || config.memory.host_budget.empty()) return o;
  const absl::StatusOr<int64_t> host = ParseByteSize(config.memory.host_budget, "memory.host_budget");
  TORCH_CHECK(host.ok(), host.status().ToString());
  int64_t resident = 0, elements = 0;
  for (int g : {Gpt::kDecay, Gpt::kNoDecay}) {
    resident += model.params(g).flat().nbytes() + model.grads(g).flat().nbytes();
    elements += model.params(g).numel();
  }
  const int64_t moments = 8 * elements;
  if (*host >= resident + moments) return o;  // everything fits in RAM
  o.chunk_elements = MomentChunkElements(elements);
  const int64_t chunk_bytes = 8 * o.chunk_elements;
  TORCH_CHECK(*host - resident >= 2 * chunk_bytes, "memory.host_budget = ",
              config.memory.host_budget, " (", *host, " bytes) cannot hold the parameters and "
              "gradients (", resident, " bytes) plus two chunks of AdamW moments (",
              2 * chunk_bytes, " bytes); raise it to at least ", resident + 2 * chunk_bytes);
  o.host_budget_bytes = *host - resident;
  o.disk_directory = config.memory.disk_path;
  o.disk_budget_bytes = DiskBudgetBytes(config);
  o.worker = worker;
  return o;
}

// The tag of the tied-embedding gradient exchange on the pipeline group; the executor's tags
// stay below it (parallel/pipeline_executor.cc).
constexpr int kTiedEmbeddingTag = 0x7ffffff0;

// Parameters of the whole model without the position embeddings (the tied head counted once).
double ModelParametersNoPos(const ModelConfig& m) {
  const double c = m.n_embd, l = m.n_layer;
  return m.vocab_size * c + l * (12 * c * c + 13 * c) + 2 * c;
}

// Model FLOPs per token of the whole model: 6 N + 12 L C T with N the parameters without the
// position embeddings (Gpt::FlopsPerToken of the full model, from the config alone).
double ModelFlopsPerToken(const ModelConfig& m) {
  return 6 * ModelParametersNoPos(m) + 12.0 * m.n_layer * m.n_embd * m.block_size;
}

// The activation plan memory.activation_budget asks for (issue 7): per micro-batch of
// train.batch_size x block_size tokens, a block keeping its activations holds (16 C + H T + 4)
// floats per token (the BlockPiece's tensors, its output included); one recomputing or
// offloading them holds its output (C per token). The first blocks give theirs up (their
// activations would wait longest, and offloading them leaves the most compute to hide the
// writes behind) until the rest fit. Those blocks offload to <memory.disk_path>/activations
// when memory.activation_offload is "always", or "auto" and a write and a read of one block
// (timed on the disk tier itself, here) take less than its forward at the GEMM peak; else they
// recompute. Offloading also holds its staging buffers, which the budget counts. Blocks are
// alike, so they all make the same choice.
struct ActivationPlanChoice {
  std::vector<ActivationMode> modes;
  std::unique_ptr<ActivationOffloader> offloader;  // when blocks offload
  std::string line;                                // for the log (empty without a budget)
};

ActivationPlanChoice ActivationPlan(const Config& config, int rank) {
  const ModelConfig& m = config.model;
  ActivationPlanChoice plan;
  plan.modes.assign(m.n_layer, ActivationMode::kKeep);
  if (config.memory.activation_budget.empty()) return plan;
  const absl::StatusOr<int64_t> budget =
      ParseByteSize(config.memory.activation_budget, "memory.activation_budget");
  TORCH_CHECK(budget.ok(), budget.status().ToString());
  const double tokens = static_cast<double>(config.train.batch_size) * m.block_size;
  const double keep = 4 * tokens * (16.0 * m.n_embd + static_cast<double>(m.n_head) * m.block_size + 4);
  const double out = 4 * tokens * m.n_embd;
  const auto kept_within = [&](double room) {
    return static_cast<int>(std::clamp<int64_t>(
        static_cast<int64_t>(std::floor((room - m.n_layer * out) / (keep - out))), 0, m.n_layer));
  };
  int kept = kept_within(static_cast<double>(*budget));
  // Block FLOPs per token, forward and backward; the forward is a third.
  const double block_flops = 72.0 * m.n_embd * m.n_embd + 12.0 * m.block_size * m.n_embd;

  const std::string& choice = config.memory.activation_offload;
  const std::string dir = config.memory.disk_path + "/activations";
  ActivationOffloadOptions o;
  double bandwidth = 0, offload_s = 0, recompute_s = 0, peak_gflops = 0;
  bool offload = false;
  std::string disk_problem;  // why "auto" could not consider offloading
  if (kept < m.n_layer && choice != "never" && !config.memory.disk_path.empty()) {
    o.directory = dir;
    o.worker = rank;
    o.slot_bytes = ActivationOffloader::PackedBytes(
        BlockInnerActivationShapes(m, config.train.batch_size, m.block_size));
    const int kept_offloading =
        kept_within(static_cast<double>(*budget) - o.staging_buffers * o.slot_bytes);
    for (int l = 0; l < m.n_layer - kept_offloading; ++l) o.blocks.push_back(l);
    absl::StatusOr<std::unique_ptr<ActivationOffloader>> opened = ActivationOffloader::Open(o);
    absl::StatusOr<double> measured =
        opened.ok() ? (*opened)->MeasureBandwidth() : absl::StatusOr<double>(opened.status());
    // "auto" falls back to recomputing on a disk that cannot take the slots; "always" is told.
    TORCH_CHECK(measured.ok() || choice != "always", measured.status().ToString());
    if (measured.ok()) {
      bandwidth = *measured;
      offload_s = 2.0 * o.slot_bytes / bandwidth;
      const absl::StatusOr<double> gflops = PeakGflops();
      TORCH_CHECK(gflops.ok(), gflops.status().ToString());
      peak_gflops = *gflops;
      recompute_s = tokens * block_flops / 3 / (peak_gflops * 1e9);
      offload = choice == "always" || offload_s < recompute_s;
    } else {
      disk_problem = std::string(measured.status().message());
    }
    if (offload) {
      kept = kept_offloading;
      plan.offloader = std::move(*opened);
    }
  }
  const int spilled = m.n_layer - kept;
  for (int l = 0; l < spilled; ++l) {
    plan.modes[l] = offload ? ActivationMode::kOffload : ActivationMode::kRecompute;
  }
  const double staging = offload ? static_cast<double>(o.staging_buffers) * o.slot_bytes : 0;
  const double peak = kept * keep + spilled * out + staging;
  const std::string disk =
      absl::StrFormat("disk %s/s: %.1f ms per block against %.1f ms to recompute at %.0f GFLOP/s",
                      FormatBytes(bandwidth), 1e3 * offload_s, 1e3 * recompute_s, peak_gflops);
  if (offload) {
    plan.line = absl::StrFormat(
        "activation plan (memory.activation_budget %s): %d of %d blocks keep their activations, "
        "%d offload them to %s (%s; memory.activation_offload %s); %s per micro-batch with %d "
        "staging buffers of %s (%s if all kept)",
        config.memory.activation_budget, kept, m.n_layer, spilled, dir, disk, choice,
        FormatBytes(peak), o.staging_buffers, FormatBytes(o.slot_bytes),
        FormatBytes(m.n_layer * keep));
  } else {
    const double extra = spilled * block_flops / 3 / ModelFlopsPerToken(m);
    plan.line = absl::StrFormat(
        "activation plan (memory.activation_budget %s): %d of %d blocks keep their activations, "
        "%d recompute them in backward; %s per micro-batch (%s if all kept), +%.1f%% FLOPs per "
        "step",
        config.memory.activation_budget, kept, m.n_layer, spilled, FormatBytes(peak),
        FormatBytes(m.n_layer * keep), 100 * extra);
    if (bandwidth > 0) plan.line += absl::StrFormat(" (not offloaded to %s: %s)", dir, disk);
    if (!disk_problem.empty()) plan.line += absl::StrCat(" (not offloaded: ", disk_problem, ")");
  }
  if (peak > static_cast<double>(*budget)) {
    plan.line += absl::StrFormat(" (over the budget even so: every block keeps its output, %s)",
                                 FormatBytes(m.n_layer * out + staging));
  }
  return plan;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// MeshStage: this rank's model stage as the pipeline executor drives it.

class MeshStage final : public parallel::StageCompute {
 public:
  using Batches = std::vector<std::pair<at::Tensor, at::Tensor>>;
  // `chunks`: this rank's model chunks, chunk c at index c (not owned).
  MeshStage(std::vector<Gpt*> chunks, int64_t batch, int64_t seq, double throttle)
      : chunks_(std::move(chunks)), batch_(batch), seq_(seq), throttle_(throttle) {}

  // The micro-batches of the next RunStep / RunForward (kept by pointer; must outlive it).
  void Begin(const Batches* batches, float loss_scale) {
    batches_ = batches;
    loss_scale_ = loss_scale;
    loss_sum_ = 0;
  }
  double loss_sum() const { return loss_sum_; }

  at::Tensor Forward(int chunk, int micro_batch, int slot, const at::Tensor& input) override {
    Gpt& model = Chunk(chunk);
    const auto& [x, y] = Batch(micro_batch);
    MicroBatch mb{&y, x.size(0), x.size(1), slot};
    const Clock::time_point t0 = Clock::now();
    at::Tensor out = model.StageForward(model.has_embedding() ? x : input, mb);
    if (model.has_head()) {
      loss_sum_ += out.item<double>();
      out = at::Tensor();
    }
    throttle_.After(Seconds(t0, Clock::now()));
    return out;
  }

  at::Tensor Backward(int chunk, int micro_batch, int slot,
                      const at::Tensor& grad_output) override {
    Gpt& model = Chunk(chunk);
    Batch(micro_batch);
    const Clock::time_point t0 = Clock::now();
    at::Tensor g = model.StageBackward(model.has_head() ? at::Tensor() : grad_output,
                                       loss_scale_, slot);
    throttle_.After(Seconds(t0, Clock::now()));
    return g;
  }

  std::vector<int64_t> ActivationShape() const override {
    return {batch_, seq_, chunks_.front()->config().n_embd};
  }

 private:
  Gpt& Chunk(int chunk) const {
    TORCH_CHECK(chunk >= 0 && static_cast<size_t>(chunk) < chunks_.size(),
                "pipeline stage asked for chunk ", chunk, " of ", chunks_.size());
    return *chunks_[chunk];
  }
  const std::pair<at::Tensor, at::Tensor>& Batch(int micro_batch) const {
    TORCH_CHECK(batches_ != nullptr && micro_batch >= 0 &&
                    static_cast<size_t>(micro_batch) < batches_->size(),
                "pipeline stage asked for micro-batch ", micro_batch, " of ",
                batches_ == nullptr ? 0 : batches_->size());
    return (*batches_)[micro_batch];
  }

  std::vector<Gpt*> chunks_;
  int64_t batch_, seq_;
  Throttle throttle_;
  const Batches* batches_ = nullptr;
  float loss_scale_ = 1;
  double loss_sum_ = 0;
};

// ---------------------------------------------------------------------------------------------
// StepEngine

StepEngine::StepEngine(const Config& config, comm::Backend* backend)
    : config_(config), backend_(backend) {
  const int world = backend != nullptr ? backend->size() : 1;
  const int rank = backend != nullptr ? backend->rank() : 0;
  // Buffers padded so N ranks own equal, cache-line-aligned shards (ZeRO-1).
  pager_ = PagerFor(config, world, rank);
  model_ = std::make_unique<Gpt>(config.model, config.train.seed, 16 * static_cast<int64_t>(world),
                                 pager_.get());
  ActivationPlanChoice activations = ActivationPlan(config, rank);
  activation_plan_ = std::move(activations.line);
  model_->SetBlockActivationModes(activations.modes, std::move(activations.offloader));
  parallel::AdamWOptions opt;
  opt.beta1 = config.optim.beta1;
  opt.beta2 = config.optim.beta2;
  opt.eps = config.optim.eps;
  opt.weight_decay = config.optim.weight_decay;
  if (config.optim.name == "demo") {
    // DeMo: every replica keeps its own residual and exchanges top-k DCT coefficients of it;
    // there is no gradient all-reduce and no AdamW state.
    parallel::DemoOptions o;
    o.codec.chunk = config.optim.demo_chunk;
    o.codec.topk = config.optim.demo_topk;
    const absl::StatusOr<at::ScalarType> wire = parallel::DemoWireDtype(config.optim.demo_wire);
    TORCH_CHECK(wire.ok(), wire.status().ToString());
    o.codec.wire_dtype = *wire;
    o.decay = config.optim.demo_decay;
    o.weight_decay = config.optim.demo_weight_decay;
    auto demo = parallel::Demo::Create(
        {{&model_->params(Gpt::kDecay), &model_->grads(Gpt::kDecay), true},
         {&model_->params(Gpt::kNoDecay), &model_->grads(Gpt::kNoDecay), false}},
        o);
    TORCH_CHECK(demo.ok(), demo.status().ToString());
    demo_ = std::move(*demo);
    if (world > 1) {
      exchange_ = parallel::MakeBackendExchange(
          backend, comm::CollectiveOptions{absl::Seconds(config.parallel.timeout_s)});
    }
    return;
  }
  const bool zero1 = config.parallel.zero == 1 && world > 1;
  optimizer_ = std::make_unique<parallel::AdamW>(
      std::vector<parallel::ParamGroup>{
          {&model_->params(Gpt::kDecay), &model_->grads(Gpt::kDecay), true},
          {&model_->params(Gpt::kNoDecay), &model_->grads(Gpt::kNoDecay), false}},
      opt, zero1 ? parallel::Shard{rank, world} : parallel::Shard{},
      MomentOffloadFor(config, *model_, rank, pager_.get()));
  if (pager_) {
    pager_->SetMomentStore(optimizer_->moment_store());
    if (config.optim.grad_clip <= 0) {
      // No clipping, so a chunk's update needs only its own gradients: step each decay chunk as
      // the last micro-batch's backward finalises it (moment chunk c is parameter chunk c: the
      // decay group comes first and the moments use the pager's chunks).
      parallel::AdamW* opt = optimizer_.get();
      pager_->SetOnGradientsFinal([opt](int chunk) { opt->StepChunk(chunk); });
      optimizer_in_backward_ = true;
    }
  }
  if (world > 1) {
    parallel::DataParallelOptions dpo;
    dpo.bucket_bytes = static_cast<int64_t>(config.parallel.bucket_mb * (1 << 20));
    dpo.zero1 = zero1;
    dpo.collective.timeout = absl::Seconds(config.parallel.timeout_s);
    dp_ = std::make_unique<parallel::DataParallel>(
        backend, std::vector<memory::FlatBuffer*>{&model_->params(0), &model_->params(1)},
        std::vector<memory::FlatBuffer*>{&model_->grads(0), &model_->grads(1)},
        model_->BackwardReadyOrder(), dpo);
  }
}

StepEngine::StepEngine(const Config& config, parallel::Mesh* mesh)
    : config_(config), backend_(mesh->world()), mesh_(mesh) {}

StepEngine::~StepEngine() = default;

absl::StatusOr<std::unique_ptr<StepEngine>> StepEngine::CreateForMesh(
    const Config& config, parallel::Mesh* mesh, double throttle,
    const std::pair<int, int>* given_blocks) {
  std::unique_ptr<StepEngine> e(new StepEngine(config, mesh));
  const parallel::MeshShape& shape = mesh->shape();
  const int n_layer = config.model.n_layer, s = mesh->coord().pp;
  // A layout from the coordinator gives one chunk per rank; the config may give several.
  const int chunks = given_blocks != nullptr ? 1 : std::max(1, config.parallel.virtual_stages);
  const int model_stages = shape.pp * chunks;
  // Blocks [first, end) of each of this rank's chunks; chunk c is model stage c * pp + s.
  std::vector<std::pair<int, int>> ranges;
  if (given_blocks == nullptr) {
    // From the config: parallel.stages, or an even split (the first stages take the remainder).
    std::vector<int> blocks = config.parallel.stages;
    if (blocks.empty()) {
      for (int j = 0; j < model_stages; ++j) {
        blocks.push_back(n_layer / model_stages + (j < n_layer % model_stages ? 1 : 0));
      }
    }
    if (static_cast<int>(blocks.size()) != model_stages) {
      return absl::InvalidArgumentError(absl::StrCat(
          "parallel.stages has ", blocks.size(), " entries for ", model_stages, " model stages"));
    }
    for (int c = 0; c < chunks; ++c) {
      const int j = c * shape.pp + s;
      int b0 = 0;
      for (int i = 0; i < j; ++i) b0 += blocks[i];
      ranges.emplace_back(b0, b0 + blocks[j]);
    }
  } else {
    const auto [b0, b1] = *given_blocks;
    const bool ok = 0 <= b0 && b0 < b1 && b1 <= n_layer && (s != 0 || b0 == 0) &&
                    (s != shape.pp - 1 || b1 == n_layer);
    if (!ok) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the layout gives pipeline stage ", s, " of ", shape.pp, " blocks [", b0, ", ", b1,
          "), which is not a non-empty range of the model's ", n_layer,
          " blocks (the first stage starts at 0, the last ends at ", n_layer, ")"));
    }
    ranges.emplace_back(b0, b1);
  }
  e->stage_blocks_ = ranges.front();
  TensorParallel tp;
  tp.group = mesh->tp();
  tp.timeout = absl::Seconds(config.parallel.timeout_s);
  for (int c = 0; c < chunks; ++c) {
    const int j = c * shape.pp + s;
    const int first_piece = j == 0 ? 0 : ranges[c].first + 1;
    const int end_piece = j == model_stages - 1 ? n_layer + 2 : ranges[c].second + 1;
    SHOAL_ASSIGN_OR_RETURN(std::unique_ptr<Gpt> chunk,
                           Gpt::CreateStage(config.model, config.train.seed, first_piece,
                                            end_piece, /*pad_multiple=*/16, tp));
    if (c == 0) {
      e->model_ = std::move(chunk);
    } else {
      e->more_chunks_.push_back(std::move(chunk));
    }
  }
  parallel::AdamWOptions opt;
  opt.beta1 = config.optim.beta1;
  opt.beta2 = config.optim.beta2;
  opt.eps = config.optim.eps;
  opt.weight_decay = config.optim.weight_decay;
  // One optimizer and one data-parallel sync over every chunk's two flat buffers.
  std::vector<parallel::ParamGroup> groups;
  std::vector<memory::FlatBuffer*> params, grads;
  std::vector<std::pair<int, int>> ready;
  const std::vector<Gpt*> all = e->chunks();
  for (size_t c = 0; c < all.size(); ++c) {
    Gpt& m = *all[c];
    groups.push_back({&m.params(Gpt::kDecay), &m.grads(Gpt::kDecay), true});
    groups.push_back({&m.params(Gpt::kNoDecay), &m.grads(Gpt::kNoDecay), false});
    for (int g = 0; g < 2; ++g) {
      params.push_back(&m.params(g));
      grads.push_back(&m.grads(g));
    }
    for (const auto& [g, entry] : m.BackwardReadyOrder()) {
      ready.emplace_back(static_cast<int>(2 * c) + g, entry);
    }
  }
  // What the step reads from the chunks, found once (the views stay valid: flat buffers never
  // move). The gradient norm counts every element of the model once: replicated parameters on
  // tensor-parallel rank 0 only, the head's copy of the tied wte not at all, one replica only.
  for (Gpt* chunk : all) {
    e->holds_head_ = e->holds_head_ || chunk->has_head();
    const bool wte_copy = chunk->has_head() && !chunk->has_embedding();
    const std::vector<ShardSpec> specs = chunk->ShardSpecs();
    const auto grads = chunk->NamedGradients();
    for (size_t i = 0; i < grads.size(); ++i) {
      const bool tied = grads[i].first == "wte.weight";
      if (tied && shape.pp > 1 && chunk->has_embedding() != chunk->has_head()) {
        e->tied_wte_.push_back({grads[i].second, chunk->has_embedding() ? shape.pp - 1 : 0});
      }
      if (mesh->coord().dp != 0 || (specs[i].dim < 0 && chunk->tp_rank() != 0) ||
          (wte_copy && tied)) {
        continue;
      }
      e->counted_grads_.push_back(grads[i].second);
    }
  }
  e->optimizer_ = std::make_unique<parallel::AdamW>(std::move(groups), opt);
  if (mesh->dp() != nullptr) {
    parallel::DataParallelOptions dpo;
    dpo.bucket_bytes = static_cast<int64_t>(config.parallel.bucket_mb * (1 << 20));
    dpo.collective.timeout = absl::Seconds(config.parallel.timeout_s);
    e->dp_ = std::make_unique<parallel::DataParallel>(mesh->dp(), params, grads, ready, dpo);
    e->ready_order_ = std::move(ready);
  }
  SHOAL_RETURN_IF_ERROR(Throttle::CheckFactor(throttle, "throttle"));
  e->stage_ = std::make_unique<MeshStage>(all, config.train.batch_size, config.model.block_size,
                                          throttle);
  const parallel::ScheduleKind kind = chunks > 1 ? parallel::ScheduleKind::kInterleaved1F1B
                                      : config.parallel.schedule == "gpipe"
                                          ? parallel::ScheduleKind::kGPipe
                                          : parallel::ScheduleKind::k1F1B;
  SHOAL_ASSIGN_OR_RETURN(
      parallel::PipelineSchedule schedule,
      parallel::MakeSchedule(kind, shape.pp, config.train.grad_accum, chunks));
  parallel::PipelineExecutorOptions xo;
  xo.transfer.timeout = absl::Seconds(config.parallel.timeout_s);
  SHOAL_ASSIGN_OR_RETURN(e->executor_, parallel::PipelineExecutor::Create(
                                           mesh->pp(), std::move(schedule), e->stage_.get(), xo));
  return e;
}

std::vector<Gpt*> StepEngine::chunks() const {
  std::vector<Gpt*> out{model_.get()};
  for (const auto& c : more_chunks_) out.push_back(c.get());
  return out;
}

std::vector<const Gpt*> StepEngine::const_chunks() const {
  std::vector<const Gpt*> out;
  for (Gpt* c : chunks()) out.push_back(c);
  return out;
}

double StepEngine::FlopsPerToken() const {
  return mesh_ != nullptr ? ModelFlopsPerToken(config_.model) : model_->FlopsPerToken();
}

int StepEngine::TotalMicroBatches(int mine) const {
  return total_micro_batches_ > 0 ? total_micro_batches_ : mine * dp_size();
}

int StepEngine::dp_rank() const {
  if (mesh_ != nullptr) return mesh_->coord().dp;
  return backend_ != nullptr ? backend_->rank() : 0;
}

int StepEngine::dp_size() const {
  if (mesh_ != nullptr) return mesh_->shape().dp;
  return backend_ != nullptr ? backend_->size() : 1;
}

parallel::PipelineStepTiming StepEngine::pipeline_timing() const {
  return executor_ ? executor_->last_timing() : parallel::PipelineStepTiming{};
}

absl::Status StepEngine::ReduceMeshGradients() {
  const comm::CollectiveOptions co{absl::Seconds(config_.parallel.timeout_s)};
  // The tied embedding: the first model stage's wte (embedding) and the last one's copy (head)
  // each hold part of the gradient; both add the other's. a + b == b + a exactly, so the two
  // copies stay bit-identical.
  for (const auto& [grad, peer] : tied_wte_) {
    at::Tensor mine = grad.clone();
    at::Tensor theirs = at::empty_like(grad);
    std::unique_ptr<comm::Work> send = mesh_->pp()->Send(mine, peer, kTiedEmbeddingTag, co);
    std::unique_ptr<comm::Work> recv = mesh_->pp()->Recv(theirs, peer, kTiedEmbeddingTag, co);
    absl::Status r = recv->Wait();
    absl::Status w = send->Wait();
    SHOAL_RETURN_IF_ERROR(r);
    SHOAL_RETURN_IF_ERROR(w);
    grad.add_(theirs);
  }
  if (dp_) {
    dp_->BeginMicroBatch(true);
    for (const auto& [g, e] : ready_order_) dp_->OnParamReady(g, e);
    SHOAL_RETURN_IF_ERROR(dp_->FinishGradients());
  }
  return absl::OkStatus();
}

absl::StatusOr<StepStats> StepEngine::MeshStep(
    int64_t step, const std::vector<std::pair<at::Tensor, at::Tensor>>& micro) {
  StepStats stats;
  stats.lr = LearningRateAt(step, config_.optim, config_.train.steps);
  for (Gpt* chunk : chunks()) chunk->ZeroGrad();
  const int total = TotalMicroBatches(static_cast<int>(micro.size()));
  stage_->Begin(&micro, static_cast<float>(dp_size()) / static_cast<float>(total));
  SHOAL_RETURN_IF_ERROR(executor_->RunStep([this] { return ReduceMeshGradients(); }));
  // Global gradient norm and the loss in one world all-reduce: each gradient element counted once
  // (counted_grads_), the loss from the last stage of each replica.
  const double norm = parallel::GlobalL2Norm(counted_grads_);
  const double sumsq = norm * norm;
  const double loss_part =
      holds_head_ && model_->tp_rank() == 0 ? stage_->loss_sum() / total : 0.0;
  at::Tensor v = at::tensor({sumsq, loss_part}, at::kDouble);
  if (backend_ != nullptr) {
    SHOAL_RETURN_IF_ERROR(backend_->AllReduce(v, comm::ReduceOp::kSum,
                                              {absl::Seconds(config_.parallel.timeout_s)})
                              ->Wait());
  }
  stats.grad_norm = std::sqrt(v[0].item<double>());
  stats.loss = v[1].item<double>();
  optimizer_->Step(stats.lr, parallel::ClipScale(stats.grad_norm, config_.optim.grad_clip));
  if (dp_) SHOAL_RETURN_IF_ERROR(dp_->FinishStep());
  return stats;
}

absl::StatusOr<double> StepEngine::EvaluateLoss(
    const std::vector<std::pair<at::Tensor, at::Tensor>>& batches) {
  if (mesh_ == nullptr) {
    double total = 0;
    for (const auto& [x, y] : batches) total += model_->Loss(x, y);
    return total / static_cast<double>(batches.size());
  }
  stage_->Begin(&batches, 1.0f);
  SHOAL_RETURN_IF_ERROR(executor_->RunForward(static_cast<int>(batches.size())));
  const bool reports = holds_head_ && model_->tp_rank() == 0 && dp_rank() == 0;
  at::Tensor v = at::full({1}, reports ? stage_->loss_sum() / batches.size() : 0.0, at::kDouble);
  if (backend_ != nullptr) {
    SHOAL_RETURN_IF_ERROR(backend_->AllReduce(v, comm::ReduceOp::kSum,
                                              {absl::Seconds(config_.parallel.timeout_s)})
                              ->Wait());
  }
  return v.item<double>();
}

absl::Status StepEngine::ModelWideState(NamedTensors* model, NamedTensors* optimizer) {
  if (mesh_ == nullptr) {
    SHOAL_ASSIGN_OR_RETURN(*optimizer, OptimizerState());
    *model = model_->NamedParameters();
    return absl::OkStatus();
  }
  const comm::CollectiveOptions co{absl::Seconds(config_.parallel.timeout_s)};
  const bool contributes = dp_rank() == 0;
  SHOAL_ASSIGN_OR_RETURN(
      *model, GatherModelWide(backend_, contributes, ShardedParameters(const_chunks()), co));
  SHOAL_ASSIGN_OR_RETURN(
      *optimizer,
      GatherModelWide(backend_, contributes,
                      ShardedOptimizerState(const_chunks(), optimizer_->StateDict()), co));
  return absl::OkStatus();
}

absl::Status StepEngine::LoadModelWide(const NamedTensors& model, const NamedTensors& optimizer) {
  if (mesh_ == nullptr) {
    if (demo_) {
      // Check the optimizer state before the parameters change.
      SHOAL_RETURN_IF_ERROR(LoadDemoState(optimizer));
      return model_->LoadParameters(model);
    }
    SHOAL_RETURN_IF_ERROR(model_->LoadParameters(model));
    return optimizer_->LoadStateDict(optimizer);
  }
  // Check the optimizer state before anything changes.
  SHOAL_ASSIGN_OR_RETURN(NamedTensors mine, SliceOptimizerState(const_chunks(), optimizer));
  for (Gpt* chunk : chunks()) SHOAL_RETURN_IF_ERROR(chunk->LoadParameters(model));
  return optimizer_->LoadStateDict(mine);
}

absl::StatusOr<StepStats> StepEngine::Step(
    int64_t step, const std::vector<std::pair<at::Tensor, at::Tensor>>& micro) {
  if (mesh_ != nullptr) return MeshStep(step, micro);
  StepStats stats;
  stats.lr = LearningRateAt(step, config_.optim, config_.train.steps);
  if (pager_) pager_->BeginStep();
  model_->ZeroGrad();
  if (demo_) {
    // Each replica's own mean gradient over its micro-batches: DeMo never averages gradients.
    const float scale = 1.0f / static_cast<float>(micro.size());
    for (const auto& [x, y] : micro) stats.loss += model_->ForwardBackward(x, y, scale);
    SHOAL_RETURN_IF_ERROR(DemoStep(step, static_cast<int>(micro.size()), &stats));
    return stats;
  }
  // Every replica scales its micro-batches' losses by dp / M (M: the step's micro-batches over
  // all replicas), so the group's mean gradient is the mean over all M, shares even or not.
  const int total = TotalMicroBatches(static_cast<int>(micro.size()));
  const float loss_scale = static_cast<float>(dp_size()) / static_cast<float>(total);
  // Data parallel: parameters report as backward finishes them, so buckets launch early.
  std::function<void(int)> on_piece_done;
  if (dp_) {
    on_piece_done = [this](int piece) {
      for (const auto& [g, e] : model_->PieceParams(piece)) dp_->OnParamReady(g, e);
    };
  }
  // The optimizer inside backward (paged, no clipping): its step begins before the last
  // micro-batch's backward steps the chunks it finishes; FinishStep below does the rest.
  if (optimizer_in_backward_) optimizer_->BeginStep(stats.lr, /*grad_scale=*/1.0);
  for (size_t m = 0; m < micro.size(); ++m) {
    if (dp_) dp_->BeginMicroBatch(m + 1 == micro.size());
    if (pager_) pager_->BeginMicroBatch(m + 1 == micro.size());
    stats.loss += model_->ForwardBackward(micro[m].first, micro[m].second, loss_scale, on_piece_done);
  }
  stats.loss *= static_cast<double>(dp_size()) / total;  // the group's Mean makes it sum / M
  if (dp_) {
    SHOAL_RETURN_IF_ERROR(dp_->FinishGradients());
    SHOAL_ASSIGN_OR_RETURN(stats.grad_norm, dp_->GradNorm());
  } else if (pager_) {
    // The decay gradients' block sums were taken as backward finished each chunk.
    stats.grad_norm = std::sqrt(parallel::GlobalSumSquares(
        {model_->grads(Gpt::kNoDecay).flat()}, pager_->DecayGradSumSquares()));
  } else {
    stats.grad_norm = parallel::GlobalL2Norm(
        {model_->grads(Gpt::kDecay).flat(), model_->grads(Gpt::kNoDecay).flat()});
  }
  if (optimizer_in_backward_) {
    optimizer_->FinishStep();
  } else {
    optimizer_->Step(stats.lr, parallel::ClipScale(stats.grad_norm, config_.optim.grad_clip));
  }
  if (dp_) {
    SHOAL_RETURN_IF_ERROR(dp_->FinishStep());
    SHOAL_ASSIGN_OR_RETURN(stats.loss, dp_->Mean(stats.loss));
    // The gradient buffers (padding included) go through a ring all-reduce.
    const int w = dp_size();
    int64_t bytes = 0;
    for (int g : {Gpt::kDecay, Gpt::kNoDecay}) bytes += model_->grads(g).flat().nbytes();
    stats.bytes_sent = stats.bytes_received = 2 * (w - 1) * bytes / w;
  }
  return stats;
}

absl::Status StepEngine::DemoStep(int64_t step, int micro_batches, StepStats* stats) {
  // The local, unsynchronised gradient is clipped, as the reference does.
  stats->grad_norm = parallel::GlobalL2Norm(
      {model_->grads(Gpt::kDecay).flat(), model_->grads(Gpt::kNoDecay).flat()});
  const double clip = parallel::ClipScale(stats->grad_norm, config_.optim.grad_clip);
  if (exchange_ == nullptr) {
    stats->loss /= micro_batches;
    const at::Tensor payload = demo_->Compress(stats->lr, clip);
    return demo_->Apply({payload}, stats->lr);
  }
  SHOAL_RETURN_IF_ERROR(demo_->Step(stats->lr, clip, exchange_.get()));
  // A ring all-gather: every rank sends and receives everybody else's payload once.
  stats->bytes_sent = stats->bytes_received =
      demo_->last_traffic().received - demo_->last_traffic().sent;
  const comm::CollectiveOptions co{absl::Seconds(config_.parallel.timeout_s)};
  // The logged loss is the mean over every replica's micro-batches (shares may be uneven).
  at::Tensor loss = at::tensor({stats->loss, static_cast<double>(micro_batches)}, at::kDouble);
  SHOAL_RETURN_IF_ERROR(backend_->AllReduce(loss, comm::ReduceOp::kSum, co)->Wait());
  stats->loss = loss[0].item<double>() / loss[1].item<double>();
  const int every = config_.optim.demo_drift_check;
  if (every > 0 && (step + 1) % every == 0) {
    SHOAL_RETURN_IF_ERROR(parallel::CheckReplicasAgree(backend_, ParameterHash(), step + 1, co));
  }
  return absl::OkStatus();
}

uint64_t StepEngine::ParameterHash() {
  if (pager_) {
    // The paged buffers are never all resident: hash the parameters read through the pager.
    std::vector<at::Tensor> values;
    for (auto& [name, v] : model_->NamedParameters()) values.push_back(std::move(v));
    return parallel::HashTensors(values);
  }
  return parallel::HashTensors(
      {model_->params(Gpt::kDecay).flat(), model_->params(Gpt::kNoDecay).flat()});
}

int64_t StepEngine::StateBytesOnDisk() const {
  int64_t bytes = 0;
  auto add = [&](const memory::TieredChunkStore& s) {
    bytes += static_cast<int64_t>(s.num_chunks()) * s.chunk_bytes() - s.stats().resident_bytes;
  };
  if (pager_) add(pager_->store());
  if (optimizer_ && optimizer_->moment_store() != nullptr) add(*optimizer_->moment_store());
  return bytes;
}

absl::Status StepEngine::StreamedState(std::vector<TensorSource>* model,
                                       std::vector<TensorSource>* optimizer) {
  TORCH_CHECK(pager_ != nullptr && optimizer_ != nullptr && optimizer_->moment_store() != nullptr,
              "StreamedState needs paged states");
  for (int g : {Gpt::kDecay, Gpt::kNoDecay}) {
    const memory::FlatBuffer& params = model_->params(g);
    for (const memory::FlatBuffer::Entry& e : params.entries()) {
      // Offsets in bytes within the tensor; whole floats, as the writer asks for.
      const int64_t base = e.offset;
      std::function<absl::Status(int64_t, int64_t, char*)> read;
      if (g == Gpt::kDecay) {
        ModelPager* pager = pager_.get();
        read = [pager, base](int64_t offset, int64_t bytes, char* out) {
          return pager->ReadParams(base + offset / 4, bytes / 4, reinterpret_cast<float*>(out));
        };
      } else {
        const float* flat = params.flat().data_ptr<float>();
        read = [flat, base](int64_t offset, int64_t bytes, char* out) {
          std::memcpy(out, flat + base + offset / 4, bytes);
          return absl::OkStatus();
        };
      }
      model->push_back({e.name, at::kFloat, e.shape, std::move(read)});
      parallel::AdamW* opt = optimizer_.get();
      for (bool second : {false, true}) {
        optimizer->push_back(
            {parallel::MomentName(second, e.name), at::kFloat, e.shape,
             [opt, g, second, base](int64_t offset, int64_t bytes, char* out) {
               return opt->ReadMoments(g, second, base + offset / 4, bytes / 4,
                                       reinterpret_cast<float*>(out));
             }});
      }
    }
  }
  const int64_t steps = optimizer_->steps();
  optimizer->push_back({"step", at::kLong, {}, [steps](int64_t, int64_t bytes, char* out) {
                          std::memcpy(out, &steps, bytes);
                          return absl::OkStatus();
                        }});
  return absl::OkStatus();
}

void StepEngine::AddMemoryPlan(StepReport* report) const {
  if (!pager_ || !pager_->plan().has_value()) return;
  const memory::MemoryPlanEstimate& plan = *pager_->plan();
  report->predicted_step_seconds = plan.step_seconds;
  report->predicted_peak_host_bytes = plan.peak_bytes;
  report->host_budget_bytes = pager_->warmup_profile().chunk_budget_bytes;
  int64_t total = static_cast<int64_t>(pager_->store().num_chunks()) * pager_->store().chunk_bytes();
  if (optimizer_ && optimizer_->moment_store() != nullptr) {
    const memory::TieredChunkStore& m = *optimizer_->moment_store();
    total += static_cast<int64_t>(m.num_chunks()) * m.chunk_bytes();
  }
  report->state_bytes = total;
}

int64_t StepEngine::optimizer_steps() const {
  return demo_ ? demo_->steps() : optimizer_->steps();
}

absl::StatusOr<NamedTensors> StepEngine::GatherDemoState() {
  // Every replica's residual differs and is worth keeping: the checkpoint holds all of them as
  // "demo.r<replica>.delta.<param>", so a resume with the same replicas continues exactly.
  const NamedTensors mine = demo_->StateDict();
  const int w = backend_ != nullptr ? backend_->size() : 1;
  const comm::CollectiveOptions co{absl::Seconds(config_.parallel.timeout_s)};
  NamedTensors out;
  for (const auto& [name, t] : mine) {
    if (!absl::StartsWith(name, kDemoDeltaPrefix)) {
      out.emplace_back(name, t.clone());
      continue;
    }
    const std::string param = name.substr(sizeof(kDemoDeltaPrefix) - 1);
    at::Tensor all = t.contiguous().view({1, -1});
    if (w > 1) {
      all = at::empty({w, t.numel()}, t.options());
      SHOAL_RETURN_IF_ERROR(backend_->AllGather(all, t.contiguous().view(-1), co)->Wait());
    }
    for (int r = 0; r < w; ++r) {
      out.emplace_back(absl::StrCat("demo.r", r, ".delta.", param), all[r].view(t.sizes()));
    }
  }
  return out;
}

absl::Status StepEngine::LoadDemoState(const NamedTensors& optimizer) {
  const int replica = backend_ != nullptr ? backend_->rank() : 0;
  const std::string own = absl::StrCat("demo.r", replica, ".delta.");
  NamedTensors mine, first;
  for (const auto& [name, t] : optimizer) {
    if (name == "demo.step") {
      mine.emplace_back(name, t);
      first.emplace_back(name, t);
    } else if (absl::StartsWith(name, own)) {
      mine.emplace_back(kDemoDeltaPrefix + name.substr(own.size()), t);
    } else if (absl::StartsWith(name, "demo.r0.delta.")) {
      first.emplace_back(kDemoDeltaPrefix + name.substr(sizeof("demo.r0.delta.") - 1),
                         at::zeros_like(t));
    }
  }
  if (mine.size() > 1 || first.size() <= 1) return demo_->LoadStateDict(mine);
  // A replica the checkpoint did not have (the run resumed on more ranks) starts from a zero
  // residual, as a worker joining a DeMo run does; it needs only the parameters.
  SHOAL_LOG(Warning) << "rank " << replica << ": the checkpoint holds no DeMo residual for this "
                     << "replica; starting it from zero";
  return demo_->LoadStateDict(first);
}

absl::StatusOr<NamedTensors> StepEngine::OptimizerState() {
  if (demo_) return GatherDemoState();
  if (optimizer_->shard().count > 1) return optimizer_->GatherStateDict(backend_);
  return optimizer_->StateDict();
}

// ---------------------------------------------------------------------------------------------
// Trainer

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::Create(const Config& config,
                                                          const TrainOptions& options) {
  SHOAL_RETURN_IF_ERROR(ValidateConfig(config));
  SHOAL_RETURN_IF_ERROR(Throttle::CheckFactor(options.throttle, "--throttle"));
  std::unique_ptr<Trainer> t(new Trainer(config, options));
  const Config& c = t->config_;
  if (options.backend != nullptr) {
    t->rank_ = options.backend->rank();
    t->world_ = options.backend->size();
  }
  // Only rank 0 talks: log lines, metrics file.
  t->options_.log = options.log && t->rank_ == 0;

  // 1. Thread pools: set by shoal, not left to chance (see device_probe.h).
  const ThreadPlan plan = ChooseThreadPlan(c.model, c.train.omp_threads, c.train.blas_threads,
                                           options.ranks_on_host);
  SHOAL_RETURN_IF_ERROR(ApplyThreadPlan(plan));
  t->omp_threads_ = plan.omp_threads;
  t->blas_threads_ = plan.blas_threads;
  if (options.log) {
    SHOAL_LOG(Info) << "threads: OpenMP " << plan.omp_threads << ", BLAS " << plan.blas_threads
                    << " (" << plan.reason << "); BLAS: " << DescribeBlas();
  }

  if (options.throttle > 1.0) {
    SHOAL_LOG(Info) << "throttle: rank " << t->rank_ << " sleeps " << options.throttle - 1.0
                    << " x its compute time after every step (a deliberately slow device)";
  }

  // Model parallelism: the mesh and its groups come before the data, whose order depends on the
  // data-parallel coordinate.
  const std::optional<parallel::MeshPlacement>& placed = options.placement;
  const bool model_parallel =
      placed ? placed->shape.tp > 1 || placed->shape.pp > 1 : c.parallel.tp > 1 || c.parallel.pp > 1;
  if (model_parallel && c.optim.name == "demo") {
    // ValidateConfig refuses tp/pp > 1 with DeMo; a coordinator's layout can still ask for it.
    return absl::FailedPreconditionError(absl::StrCat(
        "optim.name = \"demo\" runs over data parallelism only, but the layout is tp = ",
        placed ? placed->shape.tp : c.parallel.tp, ", pp = ",
        placed ? placed->shape.pp : c.parallel.pp,
        " (give the coordinator parallel.tp = 1 and parallel.pp = 1, or use AdamW)"));
  }
  std::pair<int, int> placed_blocks;
  if (model_parallel && placed) {
    placed_blocks = {placed->first_block, placed->end_block};
    SHOAL_ASSIGN_OR_RETURN(t->mesh_, parallel::Mesh::Create(options.backend, placed->shape,
                                                            options.store,
                                                            absl::Seconds(c.parallel.timeout_s),
                                                            &placed->coord));
  } else if (model_parallel) {
    SHOAL_ASSIGN_OR_RETURN(parallel::MeshShape shape,
                           parallel::ShapeForWorld(t->world_, c.parallel.tp, c.parallel.pp));
    SHOAL_ASSIGN_OR_RETURN(t->mesh_,
                           parallel::Mesh::Create(options.backend, shape, options.store,
                                                  absl::Seconds(c.parallel.timeout_s)));
  }
  const int dp_rank = t->mesh_ ? t->mesh_->coord().dp : t->rank_;
  const int dp_size = t->mesh_ ? t->mesh_->shape().dp : t->world_;
  if (placed) SHOAL_RETURN_IF_ERROR(t->FollowLayout(*placed));

  // 2. Data: token files, validated against the model's vocabulary and context.
  SHOAL_ASSIGN_OR_RETURN(t->data_, OpenTokenDataset(c.data.dir, c.model.vocab_size,
                                                    c.model.block_size, c.data.verify_checksums));
  BatchSpec spec;
  spec.batch_size = c.train.batch_size;
  spec.block_size = c.model.block_size;
  spec.grad_accum = c.train.grad_accum;
  spec.dp_rank = dp_rank;
  spec.dp_size = dp_size;
  if (t->total_micro_batches_ > 0) {
    // Uneven shares: the step's M micro-batches are numbered globally and this replica takes
    // [micro_offset_, micro_offset_ + its count), so the windows are those of one process
    // running all M (the sampler's global index with one replica of M micro-batches).
    spec.grad_accum = t->total_micro_batches_;
    spec.dp_rank = 0;
    spec.dp_size = 1;
  }
  t->train_sampler_ = std::make_unique<BatchSampler>(*t->data_.train, c.train.seed, spec);
  t->val_sampler_ = std::make_unique<BatchSampler>(*t->data_.val, c.train.seed, spec);

  // 3-4. Model and optimizer.
  if (t->mesh_) {
    SHOAL_ASSIGN_OR_RETURN(t->engine_,
                           StepEngine::CreateForMesh(c, t->mesh_.get(), options.throttle,
                                                     placed ? &placed_blocks : nullptr));
  } else {
    // The constructor throws for what it cannot build (a moment offload that does not fit).
    SHOAL_RETURN_IF_ERROR(CatchTorch("building the model and optimizer", [&] {
      t->engine_ = std::make_unique<StepEngine>(c, options.backend);
    }));
  }
  t->engine_->set_total_micro_batches(t->total_micro_batches_);
  if (t->options_.log) {
    SHOAL_LOG(Info) << "model: GPT " << c.model.n_layer << " layers, " << c.model.n_head
                    << " heads, width " << c.model.n_embd << ", context " << c.model.block_size
                    << ", vocab " << c.model.vocab_size << ": "
                    << static_cast<int64_t>(ModelParametersNoPos(c.model) +
                                            static_cast<double>(c.model.block_size) *
                                                c.model.n_embd)
                    << " parameters";
    SHOAL_LOG(Info) << "data: " << c.data.dir << ": " << t->data_.train->size() << " train / "
                    << t->data_.val->size() << " val tokens";
    const int64_t global_batch =
        static_cast<int64_t>(c.train.batch_size) *
        (t->total_micro_batches_ > 0 ? t->total_micro_batches_ : dp_size * c.train.grad_accum);
    if (t->mesh_) {
      const parallel::MeshShape& m = t->mesh_->shape();
      const std::string split =
          placed                      ? "from the coordinator's layout"
          : c.parallel.stages.empty() ? "even"
                                      : absl::StrJoin(c.parallel.stages, "/");
      const auto [b0, b1] = t->engine_->stage_blocks();
      SHOAL_LOG(Info) << "mesh " << parallel::ToString(m) << " over " << t->world_ << " ranks"
                      << (m.pp > 1 ? absl::StrCat(", ", c.parallel.schedule, " pipeline, blocks "
                                                  "per stage ", split, " (rank 0: stage ",
                                                  t->mesh_->coord().pp, ", blocks [", b0, ", ",
                                                  b1, "))")
                                   : "")
                      << "; " << c.train.grad_accum << " micro-batches of "
                      << c.train.batch_size << " sequences per replica, global batch "
                      << global_batch << " sequences";
    } else if (t->world_ > 1 && t->engine_->demo() != nullptr) {
      const parallel::Demo& d = *t->engine_->demo();
      Gpt& m = t->engine_->model();
      const double grad_bytes = static_cast<double>(m.grads(Gpt::kDecay).flat().nbytes() +
                                                    m.grads(Gpt::kNoDecay).flat().nbytes());
      SHOAL_LOG(Info) << absl::StrFormat(
          "data parallel: %d ranks over %s, DeMo (chunk %d, top-k %d, %s values, decay %g): "
          "payload %s per rank and step, %.1fx less than the %s of fp32 gradients; global "
          "batch %d sequences; replica check every %d steps",
          t->world_, options.backend->name(), c.optim.demo_chunk, c.optim.demo_topk,
          c.optim.demo_wire, c.optim.demo_decay, FormatBytes(d.PayloadBytes()),
          grad_bytes / d.PayloadBytes(), FormatBytes(grad_bytes), global_batch,
          c.optim.demo_drift_check);
    } else if (t->world_ > 1) {
      SHOAL_LOG(Info) << "data parallel: " << t->world_ << " ranks over "
                      << options.backend->name() << ", "
                      << (c.parallel.zero == 1 ? "ZeRO-1 (sharded optimizer state)"
                                               : "bucketed all-reduce")
                      << ", global batch " << global_batch << " sequences";
    } else if (t->engine_->demo() != nullptr) {
      SHOAL_LOG(Info) << "optimizer: DeMo on one process (sign of the top-k DCT of the residual, "
                         "no exchange)";
    }
    if (t->mesh_ && !c.memory.disk_path.empty()) {
      SHOAL_LOG(Warning) << "memory.disk_path: the AdamW moment offload is not available in mesh "
                            "mode yet; the moments stay in RAM";
    }
    const parallel::AdamW* adamw = t->engine_->optimizer();
    if (!t->engine_->activation_plan().empty()) {
      SHOAL_LOG(Info) << t->engine_->activation_plan();
    } else if (t->mesh_ && !c.memory.activation_budget.empty()) {
      SHOAL_LOG(Warning) << "memory.activation_budget: no activation plan in mesh mode yet; every "
                            "block keeps its activations";
    }
    if (!c.memory.device_budget.empty()) {
      SHOAL_LOG(Warning) << "memory.device_budget = " << c.memory.device_budget
                         << ": this trainer runs on the CPU, which has no device tier; the "
                            "budget bounds only what the coordinator plans for this worker";
    }
    if (t->engine_->pager() != nullptr) {
      SHOAL_LOG(Info) << "memory plan (memory.host_budget " << c.memory.host_budget
                      << "): " << t->engine_->pager()->Describe()
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
          FormatBytes(store.host_budget_bytes()), c.memory.host_budget, c.memory.disk_path);
    }
  }

  // 5. Checkpoints and resume.
  t->checkpoints_ = std::make_unique<CheckpointStore>(ResolvedCheckpointDir(c), c.checkpoint.keep);
  if (options.resume) SHOAL_RETURN_IF_ERROR(t->Resume());

  // 6. Metrics: MFU denominator and the JSONL file.
  // Rank 0 measures (or reads the cache) while the others wait in the broadcast, so ranks
  // sharing a host do not measure at once and see half the machine each.
  if (t->rank_ == 0) {
    SHOAL_ASSIGN_OR_RETURN(t->peak_gflops_, PeakGflops());
  }
  if (t->world_ > 1) {
    at::Tensor peak = at::full({1}, t->peak_gflops_, at::kDouble);
    SHOAL_RETURN_IF_ERROR(
        options.backend->Broadcast(peak, 0, {absl::Seconds(c.parallel.timeout_s)})->Wait());
    t->peak_gflops_ = peak.item<double>();
  }
  if (!options.bench && t->rank_ == 0) {
    SHOAL_RETURN_IF_ERROR(MakeDirs(c.train.out_dir));
    SHOAL_ASSIGN_OR_RETURN(MetricsFile m, MetricsFile::Open(c.train.out_dir + "/metrics.jsonl"));
    t->metrics_.emplace(std::move(m));
  }
  return t;
}

absl::Status Trainer::FollowLayout(const parallel::MeshPlacement& placed) {
  if (placed.micro_batch_size < 1 || placed.micro_batches < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the layout gives this replica ", placed.micro_batches, " micro-batches of ",
        placed.micro_batch_size, " sequences; both must be >= 1"));
  }
  // Every rank learns every rank's place: (replica, micro-batches, micro-batch size, stage,
  // first block, end block).
  constexpr int kFields = 6;
  std::vector<int64_t> table = {placed.coord.dp,    placed.micro_batches, placed.micro_batch_size,
                                placed.coord.pp,    placed.first_block,   placed.end_block};
  if (world_ > 1) {
    at::Tensor mine = at::tensor(table, at::kLong);
    at::Tensor all = at::empty({kFields * world_}, at::kLong);
    SHOAL_RETURN_IF_ERROR(
        options_.backend->AllGather(all, mine, {absl::Seconds(config_.parallel.timeout_s)})
            ->Wait());
    table.assign(all.data_ptr<int64_t>(), all.data_ptr<int64_t>() + kFields * world_);
  }
  // The stages of every replica must cover the blocks in order, each block once, and the ranks
  // of one stage (tensor-parallel, or replicas) must agree on its blocks: an activation has the
  // same shape at every boundary, so a wrong split would train a wrong model without an error.
  const int pp = placed.shape.pp;
  std::vector<std::pair<int64_t, int64_t>> range(pp, {-1, -1});
  for (int r = 0; r < static_cast<int>(table.size() / kFields); ++r) {
    const int64_t stage = table[kFields * r + 3];
    const std::pair<int64_t, int64_t> blocks = {table[kFields * r + 4], table[kFields * r + 5]};
    if (stage < 0 || stage >= pp || (range[stage].first >= 0 && range[stage] != blocks)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the layout's stages disagree: rank ", r, " has stage ", stage, " with blocks [",
          blocks.first, ", ", blocks.second, ")",
          stage >= 0 && stage < pp && range[stage].first >= 0
              ? absl::StrCat(", another rank of it [", range[stage].first, ", ",
                             range[stage].second, ")")
              : ""));
    }
    range[stage] = blocks;
  }
  for (int stage = 0; stage < pp; ++stage) {
    const int64_t expected_first = stage == 0 ? 0 : range[stage - 1].second;
    if (range[stage].first != expected_first || range[stage].second <= range[stage].first ||
        (stage == pp - 1 && range[stage].second != config_.model.n_layer)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the layout's stages do not cover the model's ", config_.model.n_layer,
          " blocks in order: stage ", stage, " has [", range[stage].first, ", ",
          range[stage].second, ")"));
    }
  }
  std::vector<int64_t> share(placed.shape.dp, -1);
  for (int r = 0; r < static_cast<int>(table.size() / kFields); ++r) {
    const int64_t replica = table[kFields * r], count = table[kFields * r + 1],
                  size = table[kFields * r + 2];
    if (replica < 0 || replica >= placed.shape.dp || count < 1 ||
        size != placed.micro_batch_size || (share[replica] >= 0 && share[replica] != count)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the layout's batch plan is inconsistent: rank ", r, " has replica ", replica, " with ",
          count, " micro-batches of ", size, " sequences; this rank has replica ",
          placed.coord.dp, " with ", placed.micro_batches, " of ", placed.micro_batch_size));
    }
    share[replica] = count;
  }
  int total = 0;
  for (int d = 0; d < placed.shape.dp; ++d) {
    if (share[d] < 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("the layout's batch plan has no rank of replica ", d));
    }
    if (d < placed.coord.dp) micro_offset_ += static_cast<int>(share[d]);
    total += static_cast<int>(share[d]);
  }
  total_micro_batches_ = total;
  config_.train.batch_size = placed.micro_batch_size;
  config_.train.grad_accum = placed.micro_batches;
  if (options_.log) {
    SHOAL_LOG(Info) << "batch plan from the layout: " << total << " micro-batches of "
                    << placed.micro_batch_size << " sequences per step over "
                    << placed.shape.dp << " replica(s), shares "
                    << absl::StrJoin(share, "/");
  }
  return absl::OkStatus();
}

absl::Status Trainer::Resume() {
  std::vector<std::string> skipped;
  SHOAL_ASSIGN_OR_RETURN(std::optional<CheckpointState> state, checkpoints_->LoadLatest(&skipped));
  if (rank_ == 0) {
    for (const std::string& s : skipped) SHOAL_LOG(Warning) << "skipping checkpoint " << s;
  }
  if (world_ > 1) {
    // Every rank must have picked the same checkpoint (or none).
    const double mine = state ? static_cast<double>(state->step) : -1.0;
    at::Tensor lo = at::full({1}, mine, at::kDouble);
    at::Tensor hi = lo.clone();
    const comm::CollectiveOptions co{absl::Seconds(config_.parallel.timeout_s)};
    SHOAL_RETURN_IF_ERROR(options_.backend->AllReduce(lo, comm::ReduceOp::kMin, co)->Wait());
    SHOAL_RETURN_IF_ERROR(options_.backend->AllReduce(hi, comm::ReduceOp::kMax, co)->Wait());
    if (lo.item<double>() != hi.item<double>()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "ranks found different checkpoints to resume from (steps ", lo.item<double>(), " to ",
          hi.item<double>(), "; -1 = none) under ", checkpoints_->root()));
    }
  }
  if (!state) {
    if (options_.log) {
      SHOAL_LOG(Warning) << "--resume: no valid checkpoint under " << checkpoints_->root()
                         << "; starting from step 0";
    }
    return absl::OkStatus();
  }
  // The checkpoint must be of the same model: compare its [model] section with ours.
  SHOAL_ASSIGN_OR_RETURN(Config saved, ParseConfig(state->config_toml, "checkpoint manifest"));
  const ModelConfig& a = saved.model;
  const ModelConfig& b = config_.model;
  if (a.n_layer != b.n_layer || a.n_head != b.n_head || a.n_embd != b.n_embd ||
      a.block_size != b.block_size || a.vocab_size != b.vocab_size) {
    return absl::FailedPreconditionError(absl::StrCat(
        "checkpoint step ", state->step, " under ", checkpoints_->root(),
        " is of another model ([model] differs from ", config_.source, ")"));
  }
  if (saved.optim.name != config_.optim.name) {
    return absl::FailedPreconditionError(absl::StrCat(
        "checkpoint step ", state->step, " under ", checkpoints_->root(),
        " was trained with optim.name = \"",
        saved.optim.name, "\", this run has \"", config_.optim.name,
        "\": switching optimizers on resume is not supported"));
  }
  if (state->step > config_.train.steps) {
    return absl::FailedPreconditionError(absl::StrCat("checkpoint is at step ", state->step,
                                                      " but train.steps is ",
                                                      config_.train.steps));
  }
  SHOAL_RETURN_IF_ERROR(engine_->LoadModelWide(state->model, state->optimizer));
  if (engine_->optimizer_steps() != state->step) {
    return absl::DataLossError(absl::StrCat("checkpoint step ", state->step,
                                            " disagrees with its optimizer step count ",
                                            engine_->optimizer_steps()));
  }
  start_step_ = state->step;
  if (options_.log) SHOAL_LOG(Info) << "resumed from " << checkpoints_->root() << " at step " << start_step_;
  return absl::OkStatus();
}

absl::StatusOr<std::string> Trainer::SaveCheckpoint(int64_t step) {
  // Under ZeRO-1 every rank takes part in gathering the optimizer state; in mesh mode every
  // rank takes part in assembling the model-wide tensors on rank 0.
  NamedTensors model_state, optimizer_state;
  std::vector<TensorSource> model_stream, optimizer_stream;
  if (engine_->pager() != nullptr) {
    // Paged states are never all in RAM: stream them from the chunk stores into the files.
    SHOAL_RETURN_IF_ERROR(engine_->StreamedState(&model_stream, &optimizer_stream));
  } else {
    SHOAL_RETURN_IF_ERROR(engine_->ModelWideState(&model_state, &optimizer_state));
  }
  std::string path;
  if (rank_ == 0) {
    CheckpointState state;
    state.step = step;
    state.config_toml = config_.ToToml();
    // The sampler is counter-based: (seed, step) is the whole RNG state of the run.
    state.rng = {{"seed", config_.train.seed},
                 {"sampler", "splitmix64(seed, global sample index)"}};
    state.data = {{"next_step", step},
                  {"dir", config_.data.dir},
                  {"train_tokens", data_.train->size()},
                  {"val_tokens", data_.val->size()},
                  {"dp_size", engine_->dp_size()}};
    state.model = std::move(model_state);
    state.optimizer = std::move(optimizer_state);
    state.model_stream = std::move(model_stream);
    state.optimizer_stream = std::move(optimizer_stream);
    SHOAL_ASSIGN_OR_RETURN(path, checkpoints_->Save(state));
  }
  if (world_ > 1) {
    // Nobody runs ahead (or exits) before the checkpoint is on disk.
    SHOAL_RETURN_IF_ERROR(
        options_.backend->Barrier({absl::Seconds(config_.parallel.timeout_s)})->Wait());
  }
  return path;
}

absl::StatusOr<double> Trainer::Evaluate() {
  const int b = config_.train.batch_size, t = config_.model.block_size;
  std::vector<std::pair<at::Tensor, at::Tensor>> batches(config_.train.eval_batches);
  for (int i = 0; i < config_.train.eval_batches; ++i) {
    auto& [x, y] = batches[i];
    x = at::empty({b, t}, at::kLong);
    y = at::empty({b, t}, at::kLong);
    val_sampler_->ValBatch(i, config_.train.eval_batches, x.data_ptr<int64_t>(),
                           y.data_ptr<int64_t>());
  }
  return engine_->EvaluateLoss(batches);
}

absl::StatusOr<TrainResult> Trainer::Run() {
  const Config& c = config_;
  TrainResult result;
  result.first_step = start_step_;
  result.peak_gflops = peak_gflops_;
  result.omp_threads = omp_threads_;
  result.blas_threads = blas_threads_;
  const int64_t end_step =
      options_.stop_after > 0 ? std::min(c.train.steps, start_step_ + options_.stop_after)
                              : c.train.steps;
  const double flops_per_token = engine_->FlopsPerToken();
  const int64_t rank_tokens_per_step =
      static_cast<int64_t>(c.train.batch_size) * c.train.grad_accum * c.model.block_size;
  const int64_t tokens_per_step =
      total_micro_batches_ > 0
          ? static_cast<int64_t>(c.train.batch_size) * total_micro_batches_ * c.model.block_size
          : rank_tokens_per_step * engine_->dp_size();
  // In mesh mode the stage throttles each forward and backward itself (a slow device delays
  // its neighbours through the pipeline, not by sleeping after the step).
  const Throttle throttle(mesh_ ? 1.0 : options_.throttle);
  // Every rank must stop at the same step, so a stop request is agreed on collectively.
  auto stop_agreed = [&]() -> absl::StatusOr<bool> {
    const bool local = options_.stop_requested != nullptr && options_.stop_requested->load();
    if (world_ == 1) return local;
    at::Tensor flag = at::full({1}, local ? 1.0 : 0.0, at::kDouble);
    SHOAL_RETURN_IF_ERROR(options_.backend
                              ->AllReduce(flag, comm::ReduceOp::kMax,
                                          {absl::Seconds(c.parallel.timeout_s)})
                              ->Wait());
    return flag.item<double>() > 0;
  };

  // Micro-batch buffers, filled in place each step.
  std::vector<std::pair<at::Tensor, at::Tensor>> micro(c.train.grad_accum);
  for (auto& [x, y] : micro) {
    x = at::empty({c.train.batch_size, c.model.block_size}, at::kLong);
    y = at::empty({c.train.batch_size, c.model.block_size}, at::kLong);
  }

  auto eval = [&](int64_t step) -> absl::Status {
    absl::StatusOr<double> evaluated = 0.0;
    SHOAL_RETURN_IF_ERROR(CatchTorch("validation", [&] { evaluated = Evaluate(); }));
    SHOAL_RETURN_IF_ERROR(evaluated.status());
    const double val = *evaluated;
    if (result.first_val_loss < 0) result.first_val_loss = val;
    result.last_val_loss = val;
    if (options_.log) SHOAL_LOG(Info) << "step " << step << " | val loss " << val;
    if (metrics_) metrics_->Write({{"kind", "val"}, {"step", step}, {"val_loss", val}});
    return absl::OkStatus();
  };
  if (!options_.bench && start_step_ == 0) SHOAL_RETURN_IF_ERROR(eval(0));

  const Clock::time_point run_start = Clock::now();
  Clock::time_point interval_start = run_start;
  double interval_compute_s = 0, interval_loss = 0, timed_s = 0;
  int64_t interval_steps = 0, timed_steps = 0;
  StepStats stats;
  parallel::PipelineStepTiming pipeline_total;
  int64_t step = start_step_;
  for (; step < end_step; ++step) {
    SHOAL_ASSIGN_OR_RETURN(const bool stop, stop_agreed());
    if (stop) {
      result.stopped_early = true;
      if (options_.log) SHOAL_LOG(Warning) << "stop requested: checkpointing at step " << step << " and exiting";
      break;
    }
    const Clock::time_point t0 = Clock::now();
    for (int m = 0; m < c.train.grad_accum; ++m) {
      train_sampler_->TrainBatch(step, micro_offset_ + m, micro[m].first.data_ptr<int64_t>(),
                                 micro[m].second.data_ptr<int64_t>());
    }
    absl::Status step_status;
    SHOAL_RETURN_IF_ERROR(CatchTorch("training step", [&] {
      auto r = engine_->Step(step, micro);
      if (r.ok()) stats = *r;
      else step_status = r.status();
    }));
    SHOAL_RETURN_IF_ERROR(step_status);
    const double compute_s = Seconds(t0, Clock::now());
    if (mesh_) {
      const parallel::PipelineStepTiming pt = engine_->pipeline_timing();
      pipeline_total.compute_s += pt.compute_s;
      pipeline_total.recv_wait_s += pt.recv_wait_s;
      pipeline_total.send_wait_s += pt.send_wait_s;
      pipeline_total.total_s += pt.total_s;
    }
    const double dt = compute_s + throttle.After(compute_s);
    if (!std::isfinite(stats.loss)) {
      return absl::AbortedError(absl::StrCat("loss is ", stats.loss, " at step ", step,
                                             "; lower optim.lr or check the data"));
    }
    result.losses.push_back(stats.loss);
    interval_compute_s += dt;
    interval_loss += stats.loss;
    ++interval_steps;
    if (step - start_step_ >= options_.bench_warmup_steps || !options_.bench) {
      timed_s += dt;
      ++timed_steps;
    }
    const int64_t done = step + 1;
    const int64_t on_disk = engine_->StateBytesOnDisk();  // for the coordinator and the metrics
    if (options_.on_step) {
      StepReport report{done, stats.loss, stats.lr,
                        dt > 0 ? static_cast<double>(rank_tokens_per_step) / dt : 0.0, dt,
                        on_disk};
      engine_->AddMemoryPlan(&report);
      options_.on_step(report);
    }
    if (done % c.train.log_every == 0 || done == end_step) {
      TrainLogRecord r;
      r.step = done;
      r.total_steps = c.train.steps;
      r.loss = interval_loss / interval_steps;
      r.lr = stats.lr;
      r.grad_norm = stats.grad_norm;
      r.tokens_per_s = tokens_per_step * interval_steps / interval_compute_s;
      r.mfu = r.tokens_per_s * flops_per_token / (peak_gflops_ * 1e9 * options_.nodes);
      r.elapsed_s = Seconds(run_start, Clock::now());
      r.eta_s = Seconds(interval_start, Clock::now()) / interval_steps * (c.train.steps - done);
      // The exchange's bytes are counted for data parallelism (all-reduce or DeMo); a mesh's
      // pipeline and tensor-parallel traffic is not, so nothing is shown there.
      const bool counted = !mesh_;
      if (world_ > 1 && counted) {
        r.bytes_sent = stats.bytes_sent;
        r.bytes_received = stats.bytes_received;
      }
      if (options_.log) SHOAL_LOG(Info) << FormatTrainLine(r);
      if (metrics_) {
        nlohmann::json record = {{"kind", "train"},     {"step", done},
                                 {"loss", r.loss},      {"lr", r.lr},
                                 {"grad_norm", r.grad_norm}, {"tokens_per_s", r.tokens_per_s},
                                 {"mfu", r.mfu},        {"elapsed_s", r.elapsed_s},
                                 {"eta_s", r.eta_s},    {"step_loss", stats.loss}};
        if (on_disk > 0) {
          record["state_bytes_on_disk"] = on_disk;
        }
        if (counted) {
          record["bytes_sent"] = stats.bytes_sent;
          record["bytes_received"] = stats.bytes_received;
        }
        metrics_->Write(record);
      }
      interval_start = Clock::now();
      interval_compute_s = interval_loss = 0;
      interval_steps = 0;
    }
    if (options_.bench) continue;
    if (c.train.eval_every > 0 && done % c.train.eval_every == 0 && done != c.train.steps) {
      SHOAL_RETURN_IF_ERROR(eval(done));
    }
    if (c.checkpoint.every > 0 && done % c.checkpoint.every == 0 && done != end_step) {
      SHOAL_ASSIGN_OR_RETURN(result.checkpoint, SaveCheckpoint(done));
      if (options_.log) SHOAL_LOG(Info) << "checkpoint: " << result.checkpoint;
    }
  }
  result.last_step = step;
  if (mesh_ && pipeline_total.total_s > 0 && options_.log_all_ranks_summary) {
    // Every rank: where its pipeline time went (a stage that mostly waits is under-loaded).
    const auto [b0, b1] = engine_->stage_blocks();
    const parallel::MeshCoord& mc = mesh_->coord();
    SHOAL_LOG(Info) << absl::StrFormat(
        "rank %d (stage %d, blocks [%d, %d), tp rank %d): computing %.1f%%, waiting for "
        "neighbours %.1f%%, finishing sends %.1f%% of %.2f s in the pipeline",
        rank_, mc.pp, b0, b1, mc.tp, 100 * pipeline_total.compute_s / pipeline_total.total_s,
        100 * pipeline_total.recv_wait_s / pipeline_total.total_s,
        100 * pipeline_total.send_wait_s / pipeline_total.total_s, pipeline_total.total_s);
  }
  if (engine_->optimizer() != nullptr && engine_->optimizer()->moment_store() != nullptr &&
      options_.log) {
    const memory::TieredChunkStore& store = *engine_->optimizer()->moment_store();
    const memory::TieredChunkStoreStats st = store.stats();
    SHOAL_LOG(Info) << absl::StrFormat(
        "optimizer moments offloaded: %d chunks of %d bytes, at most %d in RAM (peak %d of %d "
        "bytes); %d loads and %d write-backs, %d bytes read and %d written, %.2f s waited",
        store.num_chunks(), store.chunk_bytes(), store.capacity_chunks(), st.peak_resident_bytes,
        store.host_budget_bytes(), st.loads, st.write_backs, st.bytes_read, st.bytes_written,
        st.acquire_wait_seconds);
  }
  if (engine_->pager() != nullptr && options_.log) {
    const ModelPager& pager = *engine_->pager();
    const memory::TieredChunkStoreStats st = pager.store().stats();
    SHOAL_LOG(Info) << absl::StrFormat(
        "paged parameters and gradients: %d chunks of %d bytes, peak %d of %d bytes in RAM; %d "
        "loads (%d prefetched, %d hits), %d write-backs, %d bytes read and %d written, %.2f s "
        "waited; loads and zero fills per step after the warm-up %.1f (the trace predicted %d)",
        pager.store().num_chunks(), pager.store().chunk_bytes(), st.peak_resident_bytes,
        pager.store().host_budget_bytes(), st.loads, st.prefetches, st.prefetch_hits,
        st.write_backs, st.bytes_read, st.bytes_written, st.acquire_wait_seconds,
        pager.measured_loads_per_step(), pager.predicted_loads_per_step());
    if (pager.plan().has_value()) {
      // The plan's predictions against what the run did.
      SHOAL_LOG(Info) << absl::StrFormat(
          "memory plan: predicted %.3f s per step, measured %.3f s (mean after the warm-up); "
          "predicted peak %.1f MiB, measured peak RSS %.1f MiB",
          pager.plan()->step_seconds, pager.measured_step_seconds(),
          pager.plan()->peak_bytes / double(1 << 20), PeakResidentBytes() / double(1 << 20));
    }
  }
  if (engine_->demo() != nullptr && world_ > 1 && options_.log_all_ranks_summary) {
    // Every rank: a fingerprint of its parameters, so a reader (or a test) can see that the
    // replicas ended identical without trusting the in-run check.
    SHOAL_LOG(Info) << absl::StrFormat("rank %d: DeMo replica parameters hash %016x after step %d",
                                       rank_, engine_->ParameterHash(), step);
  }
  if (timed_steps > 0) {
    result.step_time_ms = 1e3 * timed_s / timed_steps;
    result.tokens_per_s = tokens_per_step * timed_steps / timed_s;
    result.mfu = result.tokens_per_s * flops_per_token / (peak_gflops_ * 1e9 * options_.nodes);
  }
  if (!options_.bench) {
    if (step == c.train.steps) SHOAL_RETURN_IF_ERROR(eval(step));
    if (step > start_step_ || result.checkpoint.empty()) {
      SHOAL_ASSIGN_OR_RETURN(result.checkpoint, SaveCheckpoint(step));
      if (options_.log) SHOAL_LOG(Info) << "checkpoint: " << result.checkpoint;
    }
  }
  return result;
}

}  // namespace shoal::runtime
