// The device tier (memory/device_cache.h). The cache's decisions are checked on every machine
// with the host backend (the "device" is host memory); where shoal is built with CUDA the same
// checks run on the GPU, through the CUDA backend's copy stream and events (skipped when no GPU is
// present), with the device AdamW kernel checked against the host formula.
#include "memory/device_cache.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "memory/adamw_math.h"
#include "memory/eviction.h"

#if defined(SHOAL_HAVE_CUDA)
#include <cuda_runtime.h>

#include "memory/cuda_backend.h"
#include "memory/device_adamw.h"
#endif

namespace shoal::memory {
namespace {

constexpr int64_t kChunkFloats = 1024;
constexpr int64_t kChunkBytes = kChunkFloats * sizeof(float);

// Where the cache's slots live, and how the test's "kernels" reach them: on the host backend
// plain memcpy; on the CUDA backend copies queued on the compute stream (so they are ordered
// against the cache's copy stream only by its events, which is what is under test).
struct Device {
  std::string name;
  std::function<std::unique_ptr<DeviceBackend>()> backend;
  // Reads a slot's floats into `out` (waits until done) / writes `in` into a slot (queued).
  std::function<void(std::vector<float>* out, const void* slot)> read;
  std::function<void(void* slot, const std::vector<float>& in)> write;
  std::function<void*(int64_t bytes)> alloc_home;
  std::function<void(void*)> free_home;
};

Device HostDevice() {
  Device d;
  d.name = "host";
  d.backend = [] { return std::make_unique<HostDeviceBackend>(); };
  d.read = [](std::vector<float>* out, const void* slot) {
    std::memcpy(out->data(), slot, out->size() * sizeof(float));
  };
  d.write = [](void* slot, const std::vector<float>& in) {
    std::memcpy(slot, in.data(), in.size() * sizeof(float));
  };
  d.alloc_home = [](int64_t bytes) { return std::malloc(bytes); };
  d.free_home = [](void* p) { std::free(p); };
  return d;
}

// Chunk homes filled with chunk-specific values; freed with the fixture's device.
class Homes {
 public:
  Homes(const Device& device, int n) : device_(device) {
    for (int c = 0; c < n; ++c) {
      homes_.push_back(device_.alloc_home(kChunkBytes));
      float* f = static_cast<float*>(homes_.back());
      for (int64_t i = 0; i < kChunkFloats; ++i) f[i] = static_cast<float>(c * 1000 + i % 7);
    }
  }
  ~Homes() {
    for (void* p : homes_) device_.free_home(p);
  }
  const std::vector<void*>& homes() const { return homes_; }
  float at(int c, int64_t i) const { return static_cast<const float*>(homes_[c])[i]; }

 private:
  const Device& device_;
  std::vector<void*> homes_;
};

absl::StatusOr<std::unique_ptr<DeviceChunkCache>> MakeCache(const Device& device,
                                                            const Homes& homes, int capacity,
                                                            int prefetch) {
  DeviceCacheOptions o;
  o.chunk_bytes = kChunkBytes;
  o.budget_bytes = capacity * kChunkBytes + kChunkBytes / 2;  // a budget that is not a multiple
  o.prefetch_depth = prefetch;
  o.homes = homes.homes();
  return DeviceChunkCache::Create(o, device.backend());
}

// Random acquires (from the trace when one is set, else uniform), some of which write a new value
// into the chunk; a reference copy of every chunk says what each acquire must read and what the
// homes hold after Flush. Up to three chunks are held at once, nested acquires included.
void RandomRun(const Device& device, int num_chunks, int capacity, int prefetch, bool traced,
               uint32_t seed) {
  SCOPED_TRACE(::testing::Message() << device.name << " chunks " << num_chunks << " capacity "
                                    << capacity << " prefetch " << prefetch << " traced "
                                    << traced << " seed " << seed);
  Homes homes(device, num_chunks);
  std::vector<std::vector<float>> ref(num_chunks, std::vector<float>(kChunkFloats));
  for (int c = 0; c < num_chunks; ++c) {
    for (int64_t i = 0; i < kChunkFloats; ++i) ref[c][i] = homes.at(c, i);
  }
  auto cache = MakeCache(device, homes, capacity, prefetch);
  ASSERT_TRUE(cache.ok()) << cache.status();
  DeviceChunkCache& dc = **cache;
  ASSERT_EQ(dc.capacity(), capacity);
  EXPECT_LE(dc.stats().slot_bytes, capacity * kChunkBytes + kChunkBytes / 2);

  std::mt19937 rng(seed);
  std::vector<int> trace;
  if (traced) {
    for (int t = 0; t < 3 * num_chunks; ++t) trace.push_back(static_cast<int>(rng() % num_chunks));
    ASSERT_TRUE(dc.SetTrace(trace).ok());
  }
  std::vector<float> buffer(kChunkFloats);
  std::vector<int> held;  // acquired, not yet released, in acquire order
  const int accesses = 400;
  for (int a = 0; a < accesses; ++a) {
    const int chunk = traced ? trace[a % trace.size()] : static_cast<int>(rng() % num_chunks);
    // Hold at most min(3, capacity) chunks (distinct or not): release the oldest first.
    while (static_cast<int>(held.size()) >= std::min(3, capacity)) {
      ASSERT_TRUE(dc.Release(held.front(), /*dirty=*/false).ok());
      held.erase(held.begin());
    }
    bool already = false;
    for (int h : held) already |= (h == chunk);
    if (!already && static_cast<int>(held.size()) >= capacity) continue;
    auto slot = dc.Acquire(chunk);
    ASSERT_TRUE(slot.ok()) << "access " << a << ": " << slot.status();
    device.read(&buffer, *slot);
    ASSERT_EQ(buffer, ref[chunk]) << "access " << a << " read stale data of chunk " << chunk;
    const bool write = rng() % 3 == 0;
    if (write) {
      for (int64_t i = 0; i < kChunkFloats; ++i) ref[chunk][i] += static_cast<float>(a + 1);
      device.write(*slot, ref[chunk]);
      ASSERT_TRUE(dc.Release(chunk, /*dirty=*/true).ok());
    } else {
      held.push_back(chunk);
    }
    ASSERT_LE(dc.stats().max_resident, capacity);
  }
  for (int h : held) ASSERT_TRUE(dc.Release(h, false).ok());
  ASSERT_TRUE(dc.Flush().ok());
  for (int c = 0; c < num_chunks; ++c) {
    for (int64_t i = 0; i < kChunkFloats; ++i) {
      ASSERT_EQ(homes.at(c, i), ref[c][i]) << "chunk " << c << " element " << i;
    }
  }
  const DeviceCacheStats& s = dc.stats();
  EXPECT_EQ(s.bytes_in, (s.demand_loads + s.prefetches) * kChunkBytes);
  EXPECT_EQ(s.bytes_out, s.write_backs * kChunkBytes);
  EXPECT_EQ(s.hits + s.demand_loads, s.acquires);
  if (traced) EXPECT_EQ(s.trace_misses, 0);
}

// The bench's pattern: forward over P_0..P_{L-1}, then backward with each layer's optimizer step
// (P_i, M_i, V_i for i = L-1..0). Chunk ids: P_i = i, M_i = L + i, V_i = 2L + i.
std::vector<int> SweepTrace(int layers) {
  std::vector<int> t;
  for (int i = 0; i < layers; ++i) t.push_back(i);
  for (int i = layers - 1; i >= 0; --i) {
    t.push_back(i);
    t.push_back(layers + i);
    t.push_back(2 * layers + i);
  }
  return t;
}

// Loads per iteration with farthest-next-use and no prefetch equal SimulateTrace's count (the
// simulation the planner uses to predict transfers), iteration by iteration.
void PredictedLoads(const Device& device) {
  const int layers = 6;
  const std::vector<int> trace = SweepTrace(layers);
  for (int capacity : {2, 3, 5, 9, 18}) {
    SCOPED_TRACE(::testing::Message() << device.name << " capacity " << capacity);
    Homes homes(device, 3 * layers);
    auto cache = MakeCache(device, homes, capacity, /*prefetch=*/0);
    ASSERT_TRUE(cache.ok()) << cache.status();
    ASSERT_TRUE((*cache)->SetTrace(trace).ok());
    for (int iterations = 1; iterations <= 3; ++iterations) {
      for (int c : trace) {
        auto slot = (*cache)->Acquire(c);
        ASSERT_TRUE(slot.ok()) << slot.status();
        ASSERT_TRUE((*cache)->Release(c, /*dirty=*/c < layers ? false : true).ok());
      }
      NextUseTable table = *NextUseTable::Build(trace);
      FarthestNextUsePolicy policy(&table);
      SimulationOptions so;
      so.capacity_chunks = capacity;
      so.iterations = iterations;
      auto sim = SimulateTrace(trace, so, policy);
      ASSERT_TRUE(sim.ok()) << sim.status();
      EXPECT_EQ((*cache)->stats().demand_loads, sim->loads) << "after " << iterations;
      EXPECT_EQ((*cache)->stats().evictions, sim->evictions) << "after " << iterations;
    }
    EXPECT_LE((*cache)->stats().max_resident, capacity);
  }
}

// With prefetch, a sweep whose capacity leaves room beyond the chunk in use and the ones
// prefetched finds every chunk resident once the trace is known: all loads are ahead of use.
void PrefetchHidesSweepLoads(const Device& device) {
  const int layers = 8;
  const std::vector<int> trace = SweepTrace(layers);
  for (int depth : {1, 2, 4}) {
    SCOPED_TRACE(::testing::Message() << device.name << " depth " << depth);
    Homes homes(device, 3 * layers);
    auto cache = MakeCache(device, homes, depth + 2, depth);
    ASSERT_TRUE(cache.ok()) << cache.status();
    ASSERT_TRUE((*cache)->SetTrace(trace).ok());
    int64_t demand_after_first = 0;
    for (int iteration = 0; iteration < 3; ++iteration) {
      const int64_t before = (*cache)->stats().demand_loads;
      for (int c : trace) {
        ASSERT_TRUE((*cache)->Acquire(c).ok());
        ASSERT_TRUE((*cache)->Release(c, c >= layers).ok());
      }
      if (iteration > 0) demand_after_first += (*cache)->stats().demand_loads - before;
    }
    EXPECT_EQ(demand_after_first, 0);
    EXPECT_GT((*cache)->stats().prefetches, 0);
  }
}

TEST(DeviceChunkCacheTest, RandomAccessesMatchAReferenceOnTheHostBackend) {
  const Device device = HostDevice();
  uint32_t seed = 1;
  for (int capacity : {1, 2, 3, 7}) {
    for (int prefetch : {0, 1, 3}) {
      for (bool traced : {false, true}) RandomRun(device, 10, capacity, prefetch, traced, seed++);
    }
  }
}

TEST(DeviceChunkCacheTest, DemandLoadsEqualTheSimulatedFarthestNextUseCount) {
  PredictedLoads(HostDevice());
}

TEST(DeviceChunkCacheTest, PrefetchMakesEverySweepAccessAHit) {
  PrefetchHidesSweepLoads(HostDevice());
}

TEST(DeviceChunkCacheTest, BadOptionsAndCallsAreRefusedWithTheirNumbers) {
  const Device device = HostDevice();
  Homes homes(device, 4);
  DeviceCacheOptions o;
  o.chunk_bytes = kChunkBytes;
  o.budget_bytes = kChunkBytes - 1;
  o.homes = homes.homes();
  auto small = DeviceChunkCache::Create(o, device.backend());
  ASSERT_FALSE(small.ok());
  EXPECT_NE(small.status().message().find(std::to_string(kChunkBytes - 1)), std::string::npos)
      << small.status();
  o.budget_bytes = 2 * kChunkBytes;
  o.chunk_bytes = 0;
  EXPECT_EQ(DeviceChunkCache::Create(o, device.backend()).status().code(),
            absl::StatusCode::kInvalidArgument);
  o.chunk_bytes = kChunkBytes;
  o.homes[2] = nullptr;
  auto null_home = DeviceChunkCache::Create(o, device.backend());
  EXPECT_NE(null_home.status().message().find("chunk 2"), std::string::npos);
  o.homes = homes.homes();
  o.prefetch_depth = -1;
  EXPECT_FALSE(DeviceChunkCache::Create(o, device.backend()).ok());
  o.prefetch_depth = 1;
  auto cache = DeviceChunkCache::Create(o, device.backend());
  ASSERT_TRUE(cache.ok());
  DeviceChunkCache& dc = **cache;
  EXPECT_EQ(dc.capacity(), 2);
  EXPECT_EQ(dc.Acquire(4).status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(dc.Release(1, false).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(dc.SetTrace(std::vector<int>{0, 9}).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(dc.Acquire(0).ok());
  ASSERT_TRUE(dc.Acquire(1).ok());
  auto full = dc.Acquire(2);
  ASSERT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(full.status().message().find("(0, 1)"), std::string::npos) << full.status();
  EXPECT_EQ(dc.Flush().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(dc.Discard(0).code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(dc.Release(0, false).ok());
  ASSERT_TRUE(dc.Release(1, false).ok());
  ASSERT_TRUE(dc.Flush().ok());
}

TEST(DeviceChunkCacheTest, DiscardDropsTheDeviceCopyAndTheHomeIsTheTruthAgain) {
  const Device device = HostDevice();
  Homes homes(device, 3);
  auto cache = MakeCache(device, homes, 2, 0);
  ASSERT_TRUE(cache.ok());
  auto slot = (*cache)->Acquire(1);
  ASSERT_TRUE(slot.ok());
  std::vector<float> changed(kChunkFloats, -5.0f);
  device.write(*slot, changed);
  ASSERT_TRUE((*cache)->Release(1, /*dirty=*/true).ok());
  ASSERT_TRUE((*cache)->Discard(1).ok());  // the device's write is dropped
  EXPECT_FALSE((*cache)->resident(1));
  static_cast<float*>(homes.homes()[1])[0] = 42.0f;  // the host changes the home
  slot = (*cache)->Acquire(1);
  ASSERT_TRUE(slot.ok());
  std::vector<float> read(kChunkFloats);
  device.read(&read, *slot);
  EXPECT_EQ(read[0], 42.0f);
  EXPECT_EQ(read[1], homes.at(1, 1));
  ASSERT_TRUE((*cache)->Release(1, false).ok());
  ASSERT_TRUE((*cache)->Flush().ok());
  EXPECT_EQ(homes.at(1, 0), 42.0f);
  EXPECT_EQ((*cache)->stats().write_backs, 0);
}

// A backend whose three queues really run asynchronously, on the test's thread: every call
// appends an operation to its queue, and operations run later, one at a time, from a randomly
// chosen queue whose head is not waiting for an event -- the orderings a GPU could produce. Event
// semantics are CUDA's: a wait is for the recording latest at the time of the wait call. The
// compute queue holds the test's "kernels" (checks and writes of slots), so a missing event in the
// cache shows up as a stale read, a lost write or a torn home.
class AsyncHostBackend final : public DeviceBackend {
 public:
  enum Queue { kIn = 0, kOut = 1, kCompute = 2 };
  struct Op {
    std::function<void()> run;  // null for records and waits
    int record = -1;            // event recorded when this op runs
    int wait = -1;              // event this op waits for ...
    int64_t wait_for = 0;       // ... until this many of its recordings have completed
  };
  explicit AsyncHostBackend(uint32_t seed, std::vector<std::string>* errors)
      : rng_(seed), errors_(errors) {}
  ~AsyncHostBackend() override {
    DrainAll();
    std::free(memory_);
  }
  std::string name() const override { return "async-host"; }
  absl::StatusOr<void*> Allocate(int64_t bytes, int num_events) override {
    memory_ = std::malloc(bytes);
    issued_.assign(num_events, 0);
    completed_.assign(num_events, 0);
    return memory_;
  }
  absl::Status CopyIn(void* dst, const void* src, int64_t bytes) override {
    Push(kIn, {[=] { std::memcpy(dst, src, bytes); }});
    return absl::OkStatus();
  }
  absl::Status CopyOut(void* dst, const void* src, int64_t bytes) override {
    Push(kOut, {[=] { std::memcpy(dst, src, bytes); }});
    return absl::OkStatus();
  }
  absl::Status RecordOnIn(int e) override { return Record(kIn, e); }
  absl::Status RecordOnOut(int e) override { return Record(kOut, e); }
  absl::Status RecordOnCompute(int e) override { return Record(kCompute, e); }
  absl::Status InWaits(int e) override { return Wait(kIn, e); }
  absl::Status OutWaits(int e) override { return Wait(kOut, e); }
  absl::Status ComputeWaits(int e) override { return Wait(kCompute, e); }
  absl::Status SynchronizeCopies() override {
    while (!queues_[kIn].empty() || !queues_[kOut].empty()) {
      if (!RunOne()) return absl::InternalError("async backend: deadlock in SynchronizeCopies");
    }
    return absl::OkStatus();
  }

  // A kernel on the compute queue.
  void Kernel(std::function<void()> run) { Push(kCompute, {std::move(run)}); }
  // Runs up to `n` ready operations, in random order across the queues.
  void RunSome(int n) {
    for (int i = 0; i < n && RunOne(); ++i) {
    }
  }
  void DrainAll() {
    while (!queues_[kIn].empty() || !queues_[kOut].empty() || !queues_[kCompute].empty()) {
      if (!RunOne()) {
        errors_->push_back("async backend: deadlock: queued operations wait forever");
        return;
      }
    }
  }

 private:
  void Push(Queue q, Op op) { queues_[q].push_back(std::move(op)); }
  absl::Status Record(Queue q, int e) {
    ++issued_.at(e);
    Op op;
    op.record = e;
    Push(q, std::move(op));
    return absl::OkStatus();
  }
  absl::Status Wait(Queue q, int e) {
    Op op;
    op.wait = e;
    op.wait_for = issued_.at(e);
    Push(q, std::move(op));
    return absl::OkStatus();
  }
  bool Ready(const Op& op) const { return op.wait < 0 || completed_[op.wait] >= op.wait_for; }
  bool RunOne() {
    std::vector<int> ready;
    for (int q = 0; q < 3; ++q) {
      if (!queues_[q].empty() && Ready(queues_[q].front())) ready.push_back(q);
    }
    if (ready.empty()) return false;
    const int q = ready[rng_() % ready.size()];
    Op op = std::move(queues_[q].front());
    queues_[q].erase(queues_[q].begin());
    if (op.run) op.run();
    if (op.record >= 0) ++completed_[op.record];
    return true;
  }

  std::mt19937 rng_;
  std::vector<std::string>* errors_;
  void* memory_ = nullptr;
  std::vector<Op> queues_[3];
  std::vector<int64_t> issued_, completed_;
};

// RandomRun's pattern against the asynchronous backend: each acquire queues a kernel that checks
// the slot against the reference as of that moment, and maybe one that writes a new value; the
// queues advance by a random number of operations after every call.
void AsyncRandomRun(int num_chunks, int capacity, int prefetch, bool traced, uint32_t seed) {
  SCOPED_TRACE(::testing::Message() << "async chunks " << num_chunks << " capacity " << capacity
                                    << " prefetch " << prefetch << " traced " << traced
                                    << " seed " << seed);
  const Device host = HostDevice();
  Homes homes(host, num_chunks);
  std::vector<std::vector<float>> ref(num_chunks, std::vector<float>(kChunkFloats));
  for (int c = 0; c < num_chunks; ++c) {
    for (int64_t i = 0; i < kChunkFloats; ++i) ref[c][i] = homes.at(c, i);
  }
  std::vector<std::string> errors;
  auto owned = std::make_unique<AsyncHostBackend>(seed * 7919u, &errors);
  AsyncHostBackend* backend = owned.get();
  DeviceCacheOptions o;
  o.chunk_bytes = kChunkBytes;
  o.budget_bytes = capacity * kChunkBytes;
  o.prefetch_depth = prefetch;
  o.homes = homes.homes();
  auto cache = DeviceChunkCache::Create(o, std::move(owned));
  ASSERT_TRUE(cache.ok()) << cache.status();
  DeviceChunkCache& dc = **cache;
  std::mt19937 rng(seed);
  std::vector<int> trace;
  if (traced) {
    for (int t = 0; t < 3 * num_chunks; ++t) trace.push_back(static_cast<int>(rng() % num_chunks));
    ASSERT_TRUE(dc.SetTrace(trace).ok());
  }
  std::vector<int> held;
  for (int a = 0; a < 300; ++a) {
    const int chunk = traced ? trace[a % trace.size()] : static_cast<int>(rng() % num_chunks);
    while (static_cast<int>(held.size()) >= std::min(2, capacity)) {
      ASSERT_TRUE(dc.Release(held.front(), false).ok());
      held.erase(held.begin());
    }
    bool already = false;
    for (int h : held) already |= (h == chunk);
    if (!already && static_cast<int>(held.size()) >= capacity) continue;
    auto slot = dc.Acquire(chunk);
    ASSERT_TRUE(slot.ok()) << slot.status();
    float* f = static_cast<float*>(*slot);
    const std::vector<float> expect = ref[chunk];
    backend->Kernel([f, expect, chunk, a, &errors] {
      if (std::memcmp(f, expect.data(), kChunkBytes) != 0) {
        errors.push_back(absl::StrCat("access ", a, ": chunk ", chunk, " read stale data"));
      }
    });
    if (rng() % 3 == 0) {
      for (int64_t i = 0; i < kChunkFloats; ++i) ref[chunk][i] += static_cast<float>(a + 1);
      const std::vector<float> value = ref[chunk];
      backend->Kernel([f, value] { std::memcpy(f, value.data(), kChunkBytes); });
      ASSERT_TRUE(dc.Release(chunk, /*dirty=*/true).ok());
    } else {
      held.push_back(chunk);
    }
    backend->RunSome(static_cast<int>(rng() % 6));
  }
  for (int h : held) ASSERT_TRUE(dc.Release(h, false).ok());
  ASSERT_TRUE(dc.Flush().ok());
  backend->DrainAll();
  for (const std::string& e : errors) ADD_FAILURE() << e;
  for (int c = 0; c < num_chunks; ++c) {
    ASSERT_EQ(std::memcmp(homes.homes()[c], ref[c].data(), kChunkBytes), 0) << "chunk " << c;
  }
}

TEST(DeviceChunkCacheTest, EventsOrderEveryTransferUnderRandomAsynchronousSchedules) {
  uint32_t seed = 1000;
  for (int capacity : {1, 2, 3, 6}) {
    for (int prefetch : {0, 2, 4}) {
      for (bool traced : {false, true}) {
        for (int repeat = 0; repeat < 3; ++repeat) {
          AsyncRandomRun(9, capacity, prefetch, traced, seed++);
        }
      }
    }
  }
}

#if defined(SHOAL_HAVE_CUDA)

// The CUDA backend on a stream of the test's own, so that the compute queue is not the legacy
// default stream (which would serialise with everything and hide missing events).
class CudaDeviceChunkCacheTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
    ASSERT_EQ(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), cudaSuccess);
    device_.name = "cuda";
    cudaStream_t stream = stream_;
    device_.backend = [stream]() -> std::unique_ptr<DeviceBackend> {
      auto b = CudaDeviceBackend::Create(stream);
      EXPECT_TRUE(b.ok()) << b.status();
      return b.ok() ? std::move(*b) : nullptr;
    };
    device_.read = [stream](std::vector<float>* out, const void* slot) {
      ASSERT_EQ(cudaMemcpyAsync(out->data(), slot, out->size() * sizeof(float),
                                cudaMemcpyDeviceToHost, stream),
                cudaSuccess);
      ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    };
    device_.write = [stream](void* slot, const std::vector<float>& in) {
      // Pageable source: the copy is complete from the host's side when the call returns, and
      // ordered on the compute stream before the release event.
      ASSERT_EQ(cudaMemcpyAsync(slot, in.data(), in.size() * sizeof(float),
                                cudaMemcpyHostToDevice, stream),
                cudaSuccess);
    };
    device_.alloc_home = [](int64_t bytes) {
      auto p = AllocatePinnedHost(bytes);
      EXPECT_TRUE(p.ok()) << p.status();
      return p.ok() ? *p : nullptr;
    };
    device_.free_home = [](void* p) { FreePinnedHost(p); };
  }
  void TearDown() override {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  cudaStream_t stream_ = nullptr;
  Device device_;
};

TEST_F(CudaDeviceChunkCacheTest, RandomAccessesMatchAReference) {
  auto description = CudaDeviceDescription();
  ASSERT_TRUE(description.ok()) << description.status();
  std::printf("device: %s\n", description->c_str());
  uint32_t seed = 100;
  for (int capacity : {1, 2, 3, 7}) {
    for (int prefetch : {0, 1, 3}) {
      for (bool traced : {false, true}) RandomRun(device_, 10, capacity, prefetch, traced, seed++);
    }
  }
}

TEST_F(CudaDeviceChunkCacheTest, DemandLoadsEqualTheSimulatedFarthestNextUseCount) {
  PredictedLoads(device_);
}

TEST_F(CudaDeviceChunkCacheTest, PrefetchMakesEverySweepAccessAHit) {
  PrefetchHidesSweepLoads(device_);
}

// The slots are the cache's only device allocation: the device's free memory drops by the
// budget's worth of whole chunks (rounded to the allocator's 2 MiB pages), never more.
TEST_F(CudaDeviceChunkCacheTest, DeviceMemoryStaysWithinTheBudget) {
  ASSERT_EQ(cudaFree(nullptr), cudaSuccess);  // the context exists before the first reading
  const int64_t chunk = 8 << 20;
  std::vector<void*> homes;
  for (int c = 0; c < 12; ++c) homes.push_back(*AllocatePinnedHost(chunk));
  int64_t free_before = 0, total = 0, free_after = 0;
  ASSERT_TRUE(CudaMemoryInfo(&free_before, &total).ok());
  {
    DeviceCacheOptions o;
    o.chunk_bytes = chunk;
    o.budget_bytes = 5 * chunk + chunk / 3;
    o.homes = homes;
    auto cache = DeviceChunkCache::Create(o, device_.backend());
    ASSERT_TRUE(cache.ok()) << cache.status();
    EXPECT_EQ((*cache)->capacity(), 5);
    for (int round = 0; round < 3; ++round) {
      for (int c = 0; c < 12; ++c) {
        ASSERT_TRUE((*cache)->Acquire(c).ok());
        ASSERT_TRUE((*cache)->Release(c, true).ok());
      }
    }
    ASSERT_TRUE((*cache)->Flush().ok());
    ASSERT_TRUE(CudaMemoryInfo(&free_after, &total).ok());
    const int64_t used = free_before - free_after;
    const int64_t page = 2 << 20;
    EXPECT_LE(used, (o.budget_bytes + page - 1) / page * page) << "used " << used;
    EXPECT_GE(used, 5 * chunk);
  }
  for (void* p : homes) FreePinnedHost(p);
}

// Device AdamW against the host formula (memory/adamw_math.h evaluated on the CPU) on random
// data over several steps: the same operations, so equal up to the rounding of fused
// multiply-adds (which nvcc and the host's AVX2/FMA clones may contract differently).
TEST_F(CudaDeviceChunkCacheTest, DeviceAdamWMatchesTheHostFormula) {
  const int64_t n = (1 << 20) + 3;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> p(n), m(n, 0.0f), v(n, 0.0f), g(n);
  for (auto& x : p) x = normal(rng);
  float *dp, *dm, *dv, *dg;
  ASSERT_EQ(cudaMalloc(&dp, n * 4), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&dm, n * 4), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&dv, n * 4), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&dg, n * 4), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(dp, p.data(), n * 4, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemset(dm, 0, n * 4), cudaSuccess);
  ASSERT_EQ(cudaMemset(dv, 0, n * 4), cudaSuccess);
  for (int step = 1; step <= 5; ++step) {
    for (auto& x : g) x = normal(rng) * 0.1f;
    ASSERT_EQ(cudaMemcpy(dg, g.data(), n * 4, cudaMemcpyHostToDevice), cudaSuccess);
    const AdamWConstants k = MakeAdamWConstants(0.9, 0.95, 1e-8, 0.1, step, 1e-3, 0.5);
    ASSERT_TRUE(DeviceAdamW(k, dg, dp, dm, dv, n, stream_).ok());
    for (int64_t i = 0; i < n; ++i) AdamWElement(k, g.data(), p.data(), m.data(), v.data(), i);
  }
  std::vector<float> got(n);
  ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(got.data(), dp, n * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  double worst = 0;
  int64_t differing = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double rel = std::abs(double(got[i]) - p[i]) / std::max(1e-3, std::abs(double(p[i])));
    worst = std::max(worst, rel);
    differing += got[i] != p[i];
  }
  std::printf("device AdamW vs host: %lld of %lld elements differ, worst relative %.3g\n",
              static_cast<long long>(differing), static_cast<long long>(n), worst);
  EXPECT_LT(worst, 1e-5);
  EXPECT_EQ(DeviceAdamW(MakeAdamWConstants(0.9, 0.95, 1e-8, 0.1, 1, 1e-3, 1.0), nullptr, dp, dm, dv, 4, stream_).code(),
            absl::StatusCode::kInvalidArgument);
  cudaFree(dp);
  cudaFree(dm);
  cudaFree(dv);
  cudaFree(dg);
}

// The optimizer through the cache: L layers' weights and moments as chunks, each layer stepped by
// the device AdamW as the sweep reaches it, with everything resident against a budget of 4
// chunks with prefetch. Paging changes where the bytes are, never what they are: the homes end
// bit-identical.
TEST_F(CudaDeviceChunkCacheTest, PagedOptimizerStepsAreBitIdenticalToResidentOnes) {
  const int layers = 6;
  const std::vector<int> trace = SweepTrace(layers);
  float* grad = nullptr;
  ASSERT_EQ(cudaMalloc(&grad, kChunkBytes), cudaSuccess);
  auto run = [&](int capacity, std::vector<std::vector<float>>* out) {
    Homes homes(device_, 3 * layers);
    for (int c = layers; c < 3 * layers; ++c) std::memset(homes.homes()[c], 0, kChunkBytes);
    auto cache = MakeCache(device_, homes, capacity, /*prefetch=*/2);
    ASSERT_TRUE(cache.ok()) << cache.status();
    DeviceChunkCache& dc = **cache;
    for (int step = 1; step <= 4; ++step) {
      if (step == 2) ASSERT_TRUE(dc.SetTrace(trace).ok());
      for (int i = 0; i < layers; ++i) {
        ASSERT_TRUE(dc.Acquire(i).ok());
        ASSERT_TRUE(dc.Release(i, false).ok());
      }
      for (int i = layers - 1; i >= 0; --i) {
        auto p = dc.Acquire(i);
        ASSERT_TRUE(p.ok()) << p.status();
        // The "backward" of layer i: a gradient that depends on the step, the layer and the
        // current weights (so a stale weight would change it).
        std::vector<float> g(kChunkFloats);
        for (int64_t e = 0; e < kChunkFloats; ++e) g[e] = std::sin(float(step * 31 + i * 7 + e));
        ASSERT_EQ(cudaMemcpyAsync(grad, g.data(), kChunkBytes, cudaMemcpyHostToDevice, stream_),
                  cudaSuccess);
        auto m = dc.Acquire(layers + i);
        auto v = dc.Acquire(2 * layers + i);
        ASSERT_TRUE(m.ok() && v.ok());
        const AdamWConstants k = MakeAdamWConstants(0.9, 0.95, 1e-8, 0.1, step, 1e-2, 1.0);
        ASSERT_TRUE(DeviceAdamW(k, grad, static_cast<float*>(*p), static_cast<float*>(*m),
                                static_cast<float*>(*v), kChunkFloats, stream_)
                        .ok());
        ASSERT_TRUE(dc.Release(i, true).ok());
        ASSERT_TRUE(dc.Release(layers + i, true).ok());
        ASSERT_TRUE(dc.Release(2 * layers + i, true).ok());
        ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);  // g's host memory is reused
      }
    }
    ASSERT_TRUE(dc.Flush().ok());
    ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
    if (capacity < 3 * layers) EXPECT_GT(dc.stats().evictions, 0);
    for (int c = 0; c < 3 * layers; ++c) {
      const float* h = static_cast<const float*>(homes.homes()[c]);
      out->emplace_back(h, h + kChunkFloats);
    }
  };
  std::vector<std::vector<float>> resident, paged;
  run(3 * layers, &resident);
  run(4, &paged);
  ASSERT_EQ(resident.size(), paged.size());
  for (size_t c = 0; c < resident.size(); ++c) {
    EXPECT_EQ(std::memcmp(resident[c].data(), paged[c].data(), kChunkBytes), 0) << "chunk " << c;
  }
  EXPECT_NE(resident[0][0], std::sin(0.0f));  // the weights did move
  cudaFree(grad);
}

#endif  // SHOAL_HAVE_CUDA

}  // namespace
}  // namespace shoal::memory
