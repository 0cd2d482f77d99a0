// The layout solver: properties over many seeded random device mixes (memory within budget,
// degrees consistent, tp groups on one host, blocks covered once, balanced stages, determinism
// under shuffling), the closed forms of the cost model, SplitLayers against brute force, and the
// planner rules on hand-made clusters.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "scheduler/layout_solver.h"
#include "scheduler/simulator.h"

namespace shoal::scheduler {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

SolverDevice Device(const std::string& id, const std::string& host, v1::DeviceKind kind,
                    double gflops, double gpu_gib, double host_gib, double disk_gib,
                    double net_gbps) {
  SolverDevice d;
  d.id = id;
  d.profile.set_host(host);
  d.profile.set_kind(kind);
  d.profile.set_device_name(kind == v1::DEVICE_KIND_CUDA ? "test GPU" : "test CPU");
  d.profile.set_fp32_gflops(gflops);
  d.profile.set_bf16_gflops(0);
  d.profile.mutable_memory()->set_gpu_bytes(static_cast<int64_t>(gpu_gib * kGiB));
  d.profile.mutable_memory()->set_host_bytes(static_cast<int64_t>(host_gib * kGiB));
  d.profile.mutable_memory()->set_disk_bytes(static_cast<int64_t>(disk_gib * kGiB));
  d.profile.set_net_gbps(net_gbps);
  d.profile.set_h2d_gbps(12);
  d.profile.set_host_copy_gbps(10);
  d.profile.set_cores(8);
  d.profile.set_throttle(1);
  return d;
}

v1::JobSpec Job(int n_layer, int n_head, int n_embd, int block_size, int vocab, int global_batch) {
  v1::JobSpec job;
  job.set_name("test");
  v1::ModelSpec* m = job.mutable_model();
  m->set_n_layer(n_layer);
  m->set_n_head(n_head);
  m->set_n_embd(n_embd);
  m->set_block_size(block_size);
  m->set_vocab_size(vocab);
  m->set_param_bytes(4);
  m->set_grad_bytes(4);
  m->set_optimizer_bytes(8);
  job.set_global_batch(global_batch);
  return job;
}

// GPT-2 parameter count written out term by term (not through ComputeModelCosts).
double TotalParams(const v1::ModelSpec& m) {
  const double C = m.n_embd();
  return m.n_layer() * (12 * C * C + 13 * C) + m.vocab_size() * C + m.block_size() * C + 2 * C;
}

int64_t TierSum(const v1::MemoryTiers& t) {
  return t.gpu_bytes() + t.host_bytes() + t.disk_bytes();
}

const v1::StatePlacement* FindState(const v1::MemoryPlan& plan, const std::string& name) {
  for (const v1::StatePlacement& s : plan.states()) {
    if (s.state() == name) return &s;
  }
  return nullptr;
}

// Every structural property a layout must have, checked against the inputs.
void CheckLayout(const std::vector<SolverDevice>& devices, const v1::JobSpec& job,
                 const SolverOptions& options, const v1::Layout& layout) {
  SCOPED_TRACE(layout.summary());
  const v1::ModelSpec& model = job.model();
  std::map<std::string, const SolverDevice*> by_id;
  for (const SolverDevice& d : devices) by_id[d.id] = &d;

  // Degrees and membership.
  ASSERT_GE(layout.tp(), 1);
  ASSERT_GE(layout.pp(), 1);
  ASSERT_GE(layout.dp(), 1);
  EXPECT_EQ(model.n_head() % layout.tp(), 0);
  EXPECT_EQ(layout.tp() * layout.pp() * layout.dp(), layout.placements_size());
  EXPECT_EQ(layout.placements_size() + layout.unused_workers_size(),
            static_cast<int>(devices.size()));
  std::set<std::string> seen;
  for (const v1::Placement& p : layout.placements()) {
    EXPECT_TRUE(by_id.count(p.worker_id())) << p.worker_id();
    EXPECT_TRUE(seen.insert(p.worker_id()).second) << "placed twice: " << p.worker_id();
  }
  for (const std::string& id : layout.unused_workers()) {
    EXPECT_TRUE(by_id.count(id)) << id;
    EXPECT_TRUE(seen.insert(id).second) << "both placed and unused: " << id;
  }
  if (job.max_tp() > 0) {
    EXPECT_LE(layout.tp(), job.max_tp());
  }
  if (job.max_pp() > 0) {
    EXPECT_LE(layout.pp(), job.max_pp());
  }

  // Pipelines: blocks [0, n_layer) once, in order; tp groups on one host; the batch is whole.
  ASSERT_EQ(layout.pipelines_size(), layout.dp());
  int micro_total = 0;
  for (const v1::Pipeline& pipe : layout.pipelines()) {
    ASSERT_EQ(pipe.stages_size(), layout.pp());
    EXPECT_GE(pipe.micro_batches(), 1);
    micro_total += pipe.micro_batches();
    int next = 0;
    for (int s = 0; s < pipe.stages_size(); ++s) {
      const v1::Stage& st = pipe.stages(s);
      EXPECT_EQ(st.index(), s);
      EXPECT_EQ(st.first_layer(), next);
      EXPECT_GT(st.end_layer(), st.first_layer());
      next = st.end_layer();
      EXPECT_EQ(st.has_embedding(), s == 0);
      EXPECT_EQ(st.has_head(), s == layout.pp() - 1);
      ASSERT_EQ(st.workers_size(), layout.tp());
      for (const std::string& w : st.workers()) {
        ASSERT_TRUE(by_id.count(w));
        EXPECT_EQ(by_id[w]->profile.host(), by_id[st.workers(0)]->profile.host())
            << "tp group spans hosts";
      }
    }
    EXPECT_EQ(next, model.n_layer());
  }
  EXPECT_EQ(micro_total * layout.micro_batch_size(), job.global_batch());

  // Memory: per device the states match the closed form, sit within the budget, activations on
  // the compute tier, and optimizer states spill before grads, grads before params.
  const double C = model.n_embd(), V = model.vocab_size(), T = model.block_size();
  const double state_bytes[3] = {model.param_bytes(), model.grad_bytes(), model.optimizer_bytes()};
  const char* state_names[3] = {"params", "grads", "optimizer"};
  for (const v1::Placement& p : layout.placements()) {
    SCOPED_TRACE(p.worker_id());
    const SolverDevice& d = *by_id[p.worker_id()];
    const v1::Stage& st = layout.pipelines(p.replica()).stages(p.stage());
    EXPECT_EQ(st.workers(p.tp_rank()), p.worker_id());
    const v1::MemoryPlan& plan = p.memory();
    const v1::MemoryTiers& budget = d.profile.memory();
    EXPECT_EQ(plan.budget().gpu_bytes(), budget.gpu_bytes());
    EXPECT_EQ(plan.budget().host_bytes(), budget.host_bytes());
    EXPECT_EQ(plan.budget().disk_bytes(), budget.disk_bytes());
    EXPECT_LE(plan.peak().gpu_bytes(), budget.gpu_bytes() * options.memory_headroom);
    EXPECT_LE(plan.peak().host_bytes(), budget.host_bytes() * options.memory_headroom);
    EXPECT_LE(plan.peak().disk_bytes(), budget.disk_bytes() * options.memory_headroom);
    if (!options.allow_disk) {
      EXPECT_EQ(plan.peak().disk_bytes(), 0);
    }
    const int n = st.end_layer() - st.first_layer();
    double params = n * (12 * C * C + 13 * C);
    if (st.has_embedding()) params += V * C + T * C;
    if (st.has_head()) params += 2 * C + (layout.pp() > 1 ? V * C : 0);
    params /= layout.tp();
    int64_t gpu = 0, host = 0, disk = 0;
    for (int i = 2; i >= 0; --i) {  // optimizer, grads, params
      const v1::StatePlacement* sp = FindState(plan, state_names[i]);
      ASSERT_NE(sp, nullptr);
      EXPECT_EQ(TierSum(sp->bytes()), static_cast<int64_t>(std::ceil(params * state_bytes[i])))
          << state_names[i];
      const bool cuda = d.profile.kind() == v1::DEVICE_KIND_CUDA;
      const int64_t on_compute = cuda ? sp->bytes().gpu_bytes() : sp->bytes().host_bytes();
      const bool spilled = on_compute < TierSum(sp->bytes());
      // A state may spill only once the state that spills before it has left the compute tier.
      if (i < 2 && spilled) {
        const v1::StatePlacement* before = FindState(plan, state_names[i + 1]);
        const int64_t before_on_compute =
            cuda ? before->bytes().gpu_bytes() : before->bytes().host_bytes();
        EXPECT_EQ(before_on_compute, 0)
            << state_names[i] << " spilled before " << state_names[i + 1];
      }
      gpu += sp->bytes().gpu_bytes();
      host += sp->bytes().host_bytes();
      disk += sp->bytes().disk_bytes();
    }
    const v1::StatePlacement* act = FindState(plan, "activations");
    ASSERT_NE(act, nullptr);
    if (d.profile.kind() == v1::DEVICE_KIND_CUDA) {
      EXPECT_EQ(act->bytes().gpu_bytes(), TierSum(act->bytes()));
    } else {
      EXPECT_EQ(act->bytes().host_bytes(), TierSum(act->bytes()));
    }
    gpu += act->bytes().gpu_bytes();
    host += act->bytes().host_bytes();
    disk += act->bytes().disk_bytes();
    EXPECT_EQ(plan.peak().gpu_bytes(), gpu);
    EXPECT_EQ(plan.peak().host_bytes(), host);
    EXPECT_EQ(plan.peak().disk_bytes(), disk);
    EXPECT_GT(p.predicted_compute_s(), 0);
  }

  // The prediction is consistent with itself: tokens per step over the step time.
  EXPECT_GT(layout.predicted_step_s(), 0);
  EXPECT_NEAR(layout.predicted_tokens_per_s(),
              job.global_batch() * model.block_size() / layout.predicted_step_s(),
              1e-9 * layout.predicted_tokens_per_s());
  for (const v1::Pipeline& pipe : layout.pipelines()) {
    EXPECT_LE(pipe.predicted_time_s(), layout.predicted_step_s() * (1 + 1e-12));
  }
  EXPECT_FALSE(layout.summary().empty());
  EXPECT_EQ(layout.version(), 0u);
}

// A random heterogeneous cluster: hosts of 1, 2, 4 or 8 devices, CUDA or CPU, with rates,
// memory and bandwidth spread over two orders of magnitude.
std::vector<SolverDevice> RandomCluster(std::mt19937_64& rng, int max_devices) {
  std::uniform_int_distribution<int> n_dist(1, max_devices);
  const int n = n_dist(rng);
  std::vector<SolverDevice> devices;
  const int host_sizes[] = {1, 2, 4, 8};
  int host = 0;
  while (static_cast<int>(devices.size()) < n) {
    const int size = host_sizes[rng() % 4];
    const bool cuda = rng() % 3 != 0;
    const double gflops = cuda ? 10000.0 * (1 + rng() % 60) : 200.0 * (1 + rng() % 20);
    const double gpu = cuda ? 8.0 * (1 + rng() % 10) : 0;
    const double ram = 4.0 * (1 + rng() % 64);
    const double disk = rng() % 2 ? 100.0 * (1 + rng() % 10) : 0;
    const double net = 0.5 * (1 + rng() % 100);
    for (int i = 0; i < size && static_cast<int>(devices.size()) < n; ++i) {
      // Devices of a host differ slightly, as measured ones do.
      const double jitter = 1.0 + 0.01 * (rng() % 5);
      devices.push_back(Device(absl::StrCat("w", devices.size()), absl::StrCat("h", host),
                               cuda ? v1::DEVICE_KIND_CUDA : v1::DEVICE_KIND_CPU, gflops * jitter,
                               gpu, ram, disk, net));
    }
    ++host;
  }
  return devices;
}

v1::JobSpec RandomJob(std::mt19937_64& rng) {
  const int heads[] = {1, 2, 4, 6, 8, 12, 16};
  const int h = heads[rng() % 7];
  const int head_dim = 16 << (rng() % 4);  // 16..128
  const int layers = 1 + static_cast<int>(rng() % 48);
  const int block = 64 << (rng() % 5);  // 64..1024
  const int vocab = rng() % 2 ? 256 : 50257;
  const int batch = 1 + static_cast<int>(rng() % 256);
  v1::JobSpec job = Job(layers, h, h * head_dim, block, vocab, batch);
  if (rng() % 4 == 0) job.set_max_pp(1 + static_cast<int>(rng() % 4));
  if (rng() % 4 == 0) job.set_max_tp(1 + static_cast<int>(rng() % 4));
  if (rng() % 4 == 0) job.set_max_micro_batch(1 + static_cast<int>(rng() % 8));
  // Sometimes a big model, so memory binds and states spill.
  // Sometimes one that fits nowhere.
  const int size = static_cast<int>(rng() % 6);
  if (size <= 1) {
    job.mutable_model()->set_n_embd(h * (size == 0 ? 256 : 1024));
    job.mutable_model()->set_n_layer(8 + static_cast<int>(rng() % 64));
  }
  return job;
}

TEST(ModelCostsTest, Gpt2SmallClosedForms) {
  const v1::JobSpec job = Job(12, 12, 768, 1024, 50257, 8);
  const ModelCosts c = ComputeModelCosts(job.model());
  EXPECT_DOUBLE_EQ(c.block_params, 7087872);  // 12·768² + 13·768
  // GPT-2 small's published parameter count (tied head, learned positions).
  EXPECT_DOUBLE_EQ(12 * c.block_params + c.embedding_params + c.final_params, 124439808);
  // 6 per parameter (weights and biases) plus attention's 12·T·C.
  EXPECT_DOUBLE_EQ(c.block_flops_per_token, 6.0 * 7087872 + 12.0 * 1024 * 768);
  // The tied head's logits and the final LayerNorm.
  EXPECT_DOUBLE_EQ(c.head_flops_per_token, 6.0 * (50257 * 768 + 2 * 768));
  // What shoal's block keeps, in fp32 floats per token: ln1, x1, ln2, out (4C), q|k|v (3C),
  // attention output (C), MLP hidden and GELU (8C), probabilities (H·T), two means and rstds (4).
  EXPECT_DOUBLE_EQ(c.block_activation_bytes_per_token, 4 * (16.0 * 768 + 12 * 1024 + 4));
  EXPECT_DOUBLE_EQ(c.state_bytes_per_param, 16);
}

TEST(UniformSplitTest, RemainderGoesFirst) {
  EXPECT_EQ(UniformSplit(10, 3), (std::vector<int>{4, 3, 3}));
  EXPECT_EQ(UniformSplit(8, 4), (std::vector<int>{2, 2, 2, 2}));
  EXPECT_EQ(UniformSplit(5, 1), (std::vector<int>{5}));
  EXPECT_TRUE(UniformSplit(5, 0).empty());
  for (int n = 1; n < 40; ++n) {
    for (int k = 1; k <= n; ++k) {
      const std::vector<int> s = UniformSplit(n, k);
      int sum = 0;
      for (int x : s) sum += x;
      EXPECT_EQ(sum, n);
      EXPECT_LE(*std::max_element(s.begin(), s.end()) - *std::min_element(s.begin(), s.end()), 1);
    }
  }
}

TEST(PipelineStepSecondsTest, OneFOneBClosedForm) {
  EXPECT_DOUBLE_EQ(PipelineStepSeconds({1, 2, 3}, 4), 3 * 3 + 6);
  EXPECT_DOUBLE_EQ(PipelineStepSeconds({2.5}, 10), 25);
  EXPECT_DOUBLE_EQ(PipelineStepSeconds({}, 3), 0);
  // Equal stages: (m + p - 1)·t, so the bubble is (p - 1)/(m + p - 1) of the step.
  for (int p = 1; p <= 8; ++p) {
    for (int m = 1; m <= 32; ++m) {
      const double step = PipelineStepSeconds(std::vector<double>(p, 0.5), m);
      EXPECT_DOUBLE_EQ(step, (m + p - 1) * 0.5);
      EXPECT_NEAR((step - m * 0.5) / step, (p - 1.0) / (m + p - 1.0), 1e-12);
    }
  }
}

// Every composition of n into k parts within the caps: the smallest possible slowest stage.
double BruteForceMinMax(int n, const std::vector<double>& a, const std::vector<double>& e,
                        const std::vector<int>& cap) {
  const int k = static_cast<int>(a.size());
  double best = std::numeric_limits<double>::infinity();
  std::vector<int> parts(k, 0);
  std::function<void(int, int)> rec = [&](int i, int left) {
    if (i == k - 1) {
      if (left < 1 || left > cap[i]) return;
      parts[i] = left;
      double worst = 0;
      for (int j = 0; j < k; ++j) worst = std::max(worst, a[j] * parts[j] + e[j]);
      best = std::min(best, worst);
      return;
    }
    for (int x = 1; x <= std::min(cap[i], left - (k - 1 - i)); ++x) {
      parts[i] = x;
      rec(i + 1, left - x);
    }
  };
  rec(0, n);
  return best;
}

TEST(SplitLayersTest, MatchesBruteForce) {
  std::mt19937_64 rng(7);
  int feasible = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    const int k = 1 + static_cast<int>(rng() % 5);
    const int n = k + static_cast<int>(rng() % 12);
    std::vector<double> a(k), e(k);
    std::vector<int> cap(k);
    for (int i = 0; i < k; ++i) {
      a[i] = 0.1 + (rng() % 1000) / 100.0;
      e[i] = rng() % 3 == 0 ? (rng() % 1000) / 50.0 : 0;
      cap[i] = 1 + static_cast<int>(rng() % (n + 1));
    }
    const double expected = BruteForceMinMax(n, a, e, cap);
    absl::StatusOr<std::vector<int>> got = SplitLayers(n, a, e, cap);
    if (std::isinf(expected)) {
      EXPECT_EQ(got.status().code(), absl::StatusCode::kResourceExhausted);
      continue;
    }
    ASSERT_TRUE(got.ok()) << got.status();
    ++feasible;
    ASSERT_EQ(static_cast<int>(got->size()), k);
    int sum = 0;
    double worst = 0;
    for (int i = 0; i < k; ++i) {
      EXPECT_GE((*got)[i], 1);
      EXPECT_LE((*got)[i], cap[i]);
      sum += (*got)[i];
      worst = std::max(worst, a[i] * (*got)[i] + e[i]);
    }
    EXPECT_EQ(sum, n);
    EXPECT_NEAR(worst, expected, 1e-9 * expected) << "trial " << trial;
  }
  EXPECT_GT(feasible, 1000);
}

TEST(SplitLayersTest, ProportionalToSpeedAndFastOnLargeInputs) {
  // Stage 0 twice as fast: twice the blocks.
  absl::StatusOr<std::vector<int>> s = SplitLayers(48, {1.0, 2.0}, {0, 0}, {48, 48});
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(*s, (std::vector<int>{32, 16}));
  // Many blocks over many stages (bisection, not block-by-block).
  std::vector<double> a(512);
  for (int i = 0; i < 512; ++i) a[i] = 1.0 + (i % 7);
  s = SplitLayers(100000, a, std::vector<double>(512, 0), std::vector<int>(512, 100000));
  ASSERT_TRUE(s.ok());
  int sum = 0;
  for (int x : *s) sum += x;
  EXPECT_EQ(sum, 100000);
}

TEST(SplitLayersTest, BadArguments) {
  EXPECT_EQ(SplitLayers(4, {}, {}, {}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SplitLayers(4, {1, 1}, {0}, {4, 4}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SplitLayers(1, {1, 1}, {0, 0}, {4, 4}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SplitLayers(4, {1, -1}, {0, 0}, {4, 4}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SplitLayers(9, {1, 1}, {0, 0}, {4, 4}).status().code(),
            absl::StatusCode::kResourceExhausted);
}

TEST(SolveLayoutTest, PropertiesOverRandomClusters) {
  std::mt19937_64 rng(20240601);
  int solved = 0, exhausted = 0, multi_stage = 0, spilled = 0;
  for (int trial = 0; trial < 300; ++trial) {
    SCOPED_TRACE(absl::StrCat("trial ", trial));
    const std::vector<SolverDevice> devices = RandomCluster(rng, 40);
    const v1::JobSpec job = RandomJob(rng);
    SolverOptions options;
    options.allow_disk = rng() % 2;
    absl::StatusOr<v1::Layout> layout = SolveLayout(devices, job, options);
    if (!layout.ok()) {
      ASSERT_EQ(layout.status().code(), absl::StatusCode::kResourceExhausted) << layout.status();
      ++exhausted;
      continue;
    }
    ++solved;
    CheckLayout(devices, job, options, *layout);
    if (layout->pp() > 1) ++multi_stage;
    if (layout->summary().find("spill") != std::string::npos) ++spilled;
    if (HasFatalFailure()) return;
  }
  // The mix exercises what it is meant to.
  EXPECT_GT(solved, 150);
  EXPECT_GT(exhausted, 0);
  EXPECT_GT(multi_stage, 10);
  EXPECT_GT(spilled, 0);
}

TEST(SolveLayoutTest, SyntheticClustersAreValid) {
  const v1::JobSpec job = Job(24, 16, 1024, 1024, 50257, 512);  // GPT-2 medium
  for (int n : {1, 3, 16, 100}) {
    const std::vector<SolverDevice> devices = SyntheticCluster(n, 11);
    absl::StatusOr<v1::Layout> layout = SolveLayout(devices, job);
    ASSERT_TRUE(layout.ok()) << layout.status();
    CheckLayout(devices, job, SolverOptions(), *layout);
  }
}

TEST(SolveLayoutTest, DeterministicUnderShuffling) {
  std::mt19937_64 rng(99);
  for (int trial = 0; trial < 40; ++trial) {
    std::vector<SolverDevice> devices = RandomCluster(rng, 32);
    const v1::JobSpec job = RandomJob(rng);
    absl::StatusOr<v1::Layout> first = SolveLayout(devices, job);
    for (int k = 0; k < 3; ++k) {
      std::shuffle(devices.begin(), devices.end(), rng);
      absl::StatusOr<v1::Layout> again = SolveLayout(devices, job);
      ASSERT_EQ(first.ok(), again.ok());
      if (first.ok()) {
        EXPECT_EQ(first->DebugString(), again->DebugString()) << "trial " << trial;
      } else {
        EXPECT_EQ(first.status(), again.status());
      }
    }
  }
}

TEST(SolveLayoutTest, BalancedStagesWhereBlocksAllowIt) {
  // Plenty of memory, a slow network and a large batch: pipelines are worth it, and memory caps
  // never bind, so the split is limited only by whole blocks.
  std::mt19937_64 rng(5);
  int checked = 0;
  SolverOptions options;
  for (int trial = 0; trial < 60; ++trial) {
    std::vector<SolverDevice> devices;
    const int n = 2 + static_cast<int>(rng() % 10);
    for (int i = 0; i < n; ++i) {
      devices.push_back(Device(absl::StrCat("w", i), absl::StrCat("h", i), v1::DEVICE_KIND_CPU,
                               500.0 * (1 + rng() % 8), 0, 4096, 0, 0.05));
    }
    v1::JobSpec job = Job(64 + static_cast<int>(rng() % 64), 8, 512, 256, 256, 1024);
    job.set_max_micro_batch(1);
    absl::StatusOr<v1::Layout> layout = SolveLayout(devices, job, options);
    ASSERT_TRUE(layout.ok()) << layout.status();
    for (const v1::Pipeline& pipe : layout->pipelines()) {
      if (pipe.stages_size() < 2) continue;
      bool fine_grained = true;
      double fastest = 1e300, slowest = 0;
      for (const v1::Stage& st : pipe.stages()) {
        if (st.end_layer() - st.first_layer() < 8) fine_grained = false;
        fastest = std::min(fastest, st.predicted_time_s());
        slowest = std::max(slowest, st.predicted_time_s());
      }
      if (!fine_grained) continue;
      ++checked;
      EXPECT_LE(slowest, fastest * (1 + options.balance_tolerance)) << layout->summary();
    }
  }
  EXPECT_GT(checked, 5);
}

TEST(SolveLayoutTest, FasterDeviceGetsProportionallyMoreBlocks) {
  // Two hosts, one twice as fast; each holds about 70% of the model, so both are needed.
  v1::JobSpec job = Job(48, 8, 1024, 256, 256, 64);
  job.set_max_micro_batch(1);
  const double state = TotalParams(job.model()) * 16;
  const double ram_gib = 0.7 * state / kGiB / 0.9 + 2;  // + room for activations
  std::vector<SolverDevice> devices = {
      Device("fast", "h0", v1::DEVICE_KIND_CPU, 2000, 0, ram_gib, 0, 25),
      Device("slow", "h1", v1::DEVICE_KIND_CPU, 1000, 0, ram_gib, 0, 25)};
  SolverOptions options;
  options.allow_disk = false;
  absl::StatusOr<v1::Layout> layout = SolveLayout(devices, job, options);
  ASSERT_TRUE(layout.ok()) << layout.status();
  ASSERT_EQ(layout->pp(), 2) << layout->summary();
  const v1::Pipeline& pipe = layout->pipelines(0);
  int fast_blocks = 0, slow_blocks = 0;
  for (const v1::Stage& st : pipe.stages()) {
    (st.workers(0) == "fast" ? fast_blocks : slow_blocks) += st.end_layer() - st.first_layer();
  }
  EXPECT_EQ(fast_blocks + slow_blocks, 48);
  EXPECT_NEAR(static_cast<double>(fast_blocks) / slow_blocks, 2.0, 0.25)
      << fast_blocks << ":" << slow_blocks;
}

TEST(SolveLayoutTest, HomogeneousWithPlentyOfMemoryIsPureDataParallel) {
  // GPT-2 small on 8 A100-like GPUs of one host (25 GB/s network).
  const v1::JobSpec job = Job(12, 12, 768, 1024, 50257, 512);
  std::vector<SolverDevice> devices;
  for (int i = 0; i < 8; ++i) {
    devices.push_back(
        Device(absl::StrCat("gpu", i), "node0", v1::DEVICE_KIND_CUDA, 250000, 80, 200, 0, 25));
  }
  absl::StatusOr<v1::Layout> layout = SolveLayout(devices, job);
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_EQ(layout->tp(), 1) << layout->summary();
  EXPECT_EQ(layout->pp(), 1) << layout->summary();
  EXPECT_EQ(layout->dp(), 8);
  EXPECT_EQ(layout->micro_batch_size(), 1);
  for (const v1::Pipeline& pipe : layout->pipelines()) EXPECT_EQ(pipe.micro_batches(), 64);
  EXPECT_TRUE(layout->unused_workers().empty());
}

TEST(SolveLayoutTest, ModelLargerThanOneDeviceIsPipelinedOrTensorParallel) {
  // 8 GPUs of 16 GiB on one host; the model's states need ~4 of them, nothing may spill.
  const v1::JobSpec base = Job(64, 16, 2048, 512, 50257, 64);
  ASSERT_GT(TotalParams(base.model()) * 16, 2.5 * 16 * kGiB);
  std::vector<SolverDevice> devices;
  for (int i = 0; i < 8; ++i) {
    devices.push_back(
        Device(absl::StrCat("gpu", i), "node0", v1::DEVICE_KIND_CUDA, 100000, 16, 0, 0, 25));
  }
  SolverOptions options;
  options.allow_disk = false;
  absl::StatusOr<v1::Layout> layout = SolveLayout(devices, base, options);
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_GT(layout->pp(), 1) << layout->summary();
  CheckLayout(devices, base, options, *layout);

  v1::JobSpec no_pp = base;
  no_pp.set_max_pp(1);
  layout = SolveLayout(devices, no_pp, options);
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_EQ(layout->pp(), 1);
  EXPECT_GT(layout->tp(), 1) << layout->summary();
  CheckLayout(devices, no_pp, options, *layout);
}

TEST(SolveLayoutTest, ImpossibleModelReportsShortfall) {
  const v1::JobSpec job = Job(96, 64, 8192, 1024, 50257, 16);
  std::vector<SolverDevice> devices = {
      Device("a", "h0", v1::DEVICE_KIND_CUDA, 100000, 40, 64, 100, 25),
      Device("b", "h1", v1::DEVICE_KIND_CPU, 2000, 0, 128, 0, 10),
      Device("c", "h2", v1::DEVICE_KIND_CUDA, 100000, 24, 32, 0, 25)};
  for (bool allow_disk : {true, false}) {
    SolverOptions options;
    options.allow_disk = allow_disk;
    // Independent closed form: every state byte of the model vs. every usable byte.
    const int64_t need = static_cast<int64_t>(std::ceil(TotalParams(job.model()) * 16));
    int64_t hold = 0;
    for (const SolverDevice& d : devices) {
      const v1::MemoryTiers& m = d.profile.memory();
      hold += static_cast<int64_t>(std::floor(m.gpu_bytes() * options.memory_headroom));
      hold += static_cast<int64_t>(std::floor(m.host_bytes() * options.memory_headroom));
      if (allow_disk)
        hold += static_cast<int64_t>(std::floor(m.disk_bytes() * options.memory_headroom));
    }
    ASSERT_GT(need, hold);
    absl::StatusOr<v1::Layout> layout = SolveLayout(devices, job, options);
    ASSERT_EQ(layout.status().code(), absl::StatusCode::kResourceExhausted) << layout.status();
    const std::string msg(layout.status().message());
    EXPECT_NE(msg.find(absl::StrCat("needs ", need, " bytes")), std::string::npos) << msg;
    EXPECT_NE(msg.find(absl::StrCat("at most ", hold)), std::string::npos) << msg;
    EXPECT_NE(msg.find(absl::StrCat("short by ", need - hold, " bytes")), std::string::npos) << msg;
  }
}

TEST(SolveLayoutTest, BadInputsNameTheField) {
  const std::vector<SolverDevice> devices = {
      Device("a", "h0", v1::DEVICE_KIND_CPU, 1000, 0, 64, 0, 1)};
  absl::StatusOr<v1::Layout> r = SolveLayout({}, Job(2, 2, 64, 64, 256, 4));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("devices"), absl::string_view::npos);

  struct Case {
    std::function<void(v1::JobSpec*)> edit;
    const char* field;
  } cases[] = {
      {[](v1::JobSpec* j) { j->mutable_model()->set_n_layer(0); }, "job.model.n_layer"},
      {[](v1::JobSpec* j) { j->mutable_model()->set_n_head(-1); }, "job.model.n_head"},
      {[](v1::JobSpec* j) { j->mutable_model()->set_n_embd(65); }, "job.model.n_embd"},
      {[](v1::JobSpec* j) { j->mutable_model()->set_block_size(0); }, "job.model.block_size"},
      {[](v1::JobSpec* j) { j->mutable_model()->set_vocab_size(0); }, "job.model.vocab_size"},
      {[](v1::JobSpec* j) { j->set_global_batch(0); }, "job.global_batch"},
      {[](v1::JobSpec* j) { j->mutable_model()->set_param_bytes(0); }, "job.model.param_bytes"},
      {[](v1::JobSpec* j) { j->mutable_model()->set_grad_bytes(NAN); }, "job.model.grad_bytes"},
      {[](v1::JobSpec* j) { j->set_max_pp(-2); }, "job.max_pp"},
  };
  for (const Case& c : cases) {
    v1::JobSpec job = Job(2, 2, 64, 64, 256, 4);
    c.edit(&job);
    r = SolveLayout(devices, job);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << c.field;
    EXPECT_NE(r.status().message().find(c.field), absl::string_view::npos) << r.status();
  }
  SolverOptions bad;
  bad.compute_efficiency = 0;
  r = SolveLayout(devices, Job(2, 2, 64, 64, 256, 4), bad);
  EXPECT_NE(r.status().message().find("options.compute_efficiency"), absl::string_view::npos);
  // The same id twice is not two devices.
  r = SolveLayout({devices[0], devices[0]}, Job(2, 2, 64, 64, 256, 4));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(SolveLayoutTest, UnevenReplicasGetUnevenShares) {
  // Two single-device replicas, one three times as fast, a model that fits either: the faster
  // gets about three times the micro-batches.
  const v1::JobSpec job = Job(4, 4, 256, 128, 256, 400);
  std::vector<SolverDevice> devices = {
      Device("fast", "h0", v1::DEVICE_KIND_CPU, 3000, 0, 64, 0, 50),
      Device("slow", "h1", v1::DEVICE_KIND_CPU, 1000, 0, 64, 0, 50)};
  v1::JobSpec dp_only = job;
  dp_only.set_max_pp(1);
  absl::StatusOr<v1::Layout> layout = SolveLayout(devices, dp_only);
  ASSERT_TRUE(layout.ok()) << layout.status();
  ASSERT_EQ(layout->dp(), 2) << layout->summary();
  std::map<std::string, int> micro;
  for (const v1::Pipeline& pipe : layout->pipelines()) {
    micro[pipe.stages(0).workers(0)] = pipe.micro_batches() * layout->micro_batch_size();
  }
  EXPECT_EQ(micro["fast"] + micro["slow"], 400);
  EXPECT_NEAR(micro["fast"], 300, 2);
}

}  // namespace
}  // namespace shoal::scheduler

namespace shoal::scheduler {
namespace {

TEST(SolveLayoutTest, PlaceAllUsesEveryDeviceEvenWhereOneWouldNotPay) {
  // A fast device and one 50 times slower behind a slow link: a swarm leaves the slow one out;
  // a launcher's fixed world (place_all) places it, with the smaller share of the batch.
  v1::JobSpec job = Job(4, 4, 256, 128, 256, 16);
  job.set_max_pp(1);
  const std::vector<SolverDevice> devices = {
      Device("fast", "h0", v1::DEVICE_KIND_CPU, 5000, 0, 64, 0, 0.2),
      Device("slow", "h1", v1::DEVICE_KIND_CPU, 100, 0, 64, 0, 0.2)};
  absl::StatusOr<v1::Layout> swarm = SolveLayout(devices, job);
  ASSERT_TRUE(swarm.ok()) << swarm.status();
  ASSERT_EQ(swarm->unused_workers_size(), 1) << swarm->summary();
  EXPECT_EQ(swarm->unused_workers(0), "slow");

  job.set_place_all(true);
  absl::StatusOr<v1::Layout> fixed = SolveLayout(devices, job);
  ASSERT_TRUE(fixed.ok()) << fixed.status();
  CheckLayout(devices, job, SolverOptions(), *fixed);
  EXPECT_EQ(fixed->unused_workers_size(), 0) << fixed->summary();
  ASSERT_EQ(fixed->dp(), 2) << fixed->summary();
  std::map<std::string, int> micro;
  for (const v1::Pipeline& pipe : fixed->pipelines()) {
    micro[pipe.stages(0).workers(0)] = pipe.micro_batches();
  }
  EXPECT_GT(micro["fast"], micro["slow"]);
  EXPECT_GE(micro["slow"], 1);
  // Placing the slow device cannot be predicted faster than leaving it out.
  EXPECT_LE(fixed->predicted_tokens_per_s(), swarm->predicted_tokens_per_s() * 1.0001);
}

TEST(SolveLayoutTest, PlaceAllOverRandomClustersPlacesEveryDeviceOrSaysWhy) {
  std::mt19937_64 rng(20261127);
  int solved = 0, refused = 0;
  for (int trial = 0; trial < 200; ++trial) {
    SCOPED_TRACE(absl::StrCat("trial ", trial));
    const std::vector<SolverDevice> devices = RandomCluster(rng, 8);
    v1::JobSpec job = RandomJob(rng);
    job.set_place_all(true);
    absl::StatusOr<v1::Layout> layout = SolveLayout(devices, job);
    if (!layout.ok()) {
      ASSERT_EQ(layout.status().code(), absl::StatusCode::kResourceExhausted) << layout.status();
      ++refused;
      continue;
    }
    ++solved;
    CheckLayout(devices, job, SolverOptions(), *layout);
    EXPECT_EQ(layout->placements_size(), static_cast<int>(devices.size())) << layout->summary();
    EXPECT_EQ(layout->unused_workers_size(), 0);
    if (HasFatalFailure()) return;
  }
  EXPECT_GT(solved, 50);
}

TEST(SolveLayoutTest, PlaceAllImpossibleNamesTheConstraint) {
  // Three devices, a batch of two sequences and no pipelines: no layout uses all three.
  v1::JobSpec job = Job(2, 2, 64, 64, 256, 2);
  job.set_max_pp(1);
  job.set_place_all(true);
  const std::vector<SolverDevice> devices = {
      Device("a", "h0", v1::DEVICE_KIND_CPU, 1000, 0, 8, 0, 10),
      Device("b", "h1", v1::DEVICE_KIND_CPU, 1000, 0, 8, 0, 10),
      Device("c", "h2", v1::DEVICE_KIND_CPU, 1000, 0, 8, 0, 10)};
  absl::StatusOr<v1::Layout> r = SolveLayout(devices, job);
  ASSERT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
  EXPECT_NE(r.status().message().find("place_all"), absl::string_view::npos) << r.status();
  EXPECT_NE(r.status().message().find("all 3 workers"), absl::string_view::npos) << r.status();
  // An unusable device cannot be placed at all.
  std::vector<SolverDevice> broken = devices;
  broken[2].profile.set_fp32_gflops(0);
  job.set_global_batch(4);
  r = SolveLayout(broken, job);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
  EXPECT_NE(r.status().message().find("c"), absl::string_view::npos);
}

}  // namespace
}  // namespace shoal::scheduler
