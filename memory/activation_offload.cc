#include "memory/activation_offload.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace shoal::memory {
namespace {

int64_t Aligned(int64_t bytes) {
  return (bytes + ActivationOffloader::kAlignment - 1) / ActivationOffloader::kAlignment *
         ActivationOffloader::kAlignment;
}

int64_t FloatBytes(const std::vector<int64_t>& shape) {
  int64_t n = 4;
  for (int64_t d : shape) n *= d;
  return n;
}

}  // namespace

int64_t ActivationOffloader::PackedBytes(const std::vector<std::vector<int64_t>>& shapes) {
  int64_t bytes = 0;
  for (const std::vector<int64_t>& shape : shapes) {
    if (!shape.empty()) bytes += Aligned(FloatBytes(shape));
  }
  return bytes;
}

ActivationOffloader::ActivationOffloader(const ActivationOffloadOptions& options)
    : options_(options) {}

absl::StatusOr<std::unique_ptr<ActivationOffloader>> ActivationOffloader::Open(
    const ActivationOffloadOptions& options) {
  if (options.blocks.empty() || options.micro_batch_slots < 1 || options.slot_bytes <= 0 ||
      options.staging_buffers < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "activation offload: ", options.blocks.size(), " blocks, ", options.micro_batch_slots,
        " micro-batch slots, slots of ", options.slot_bytes, " bytes and ",
        options.staging_buffers, " staging buffers: all must be positive"));
  }
  std::unique_ptr<ActivationOffloader> o(new ActivationOffloader(options));
  for (size_t i = 0; i < options.blocks.size(); ++i) {
    const int block = options.blocks[i];
    if (block < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("activation offload: block index ", block, " is negative"));
    }
    if (static_cast<size_t>(block) >= o->block_index_.size()) o->block_index_.resize(block + 1, -1);
    if (o->block_index_[block] >= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("activation offload: block ", block, " is listed twice"));
    }
    o->block_index_[block] = static_cast<int>(i);
  }
  memory::DiskTierOptions t;
  t.directory = options.directory;
  t.worker = options.worker;
  t.slot_bytes = options.slot_bytes;
  t.num_slots = static_cast<int64_t>(options.blocks.size()) * options.micro_batch_slots;
  // Exactly the file: these slots are all the tier ever holds (memory.disk_budget bounds the
  // model states' tier, not this scratch).
  t.budget_bytes = memory::DiskTier::FileBytes(t.slot_bytes, t.num_slots);
  t.backend = options.backend;
  absl::StatusOr<std::unique_ptr<memory::DiskTier>> tier = memory::DiskTier::Open(t);
  if (!tier.ok()) {
    return absl::Status(tier.status().code(),
                        absl::StrCat("memory.disk_path: cannot open the activation offload's "
                                     "disk tier: ", tier.status().message()));
  }
  o->tier_ = std::move(*tier);
  o->buffers_.resize(options.staging_buffers);
  o->order_.resize(options.micro_batch_slots);
  return o;
}

ActivationOffloader::~ActivationOffloader() {
  // The buffers must outlive their operations; the tier's own destructor drains too, but only
  // after these members would be gone.
  if (tier_ != nullptr) (void)tier_->Drain();
}

int64_t ActivationOffloader::Key(int block, int slot) const {
  TORCH_CHECK(block >= 0 && static_cast<size_t>(block) < block_index_.size() &&
                  block_index_[block] >= 0,
              "activation offload: block ", block, " was not planned to offload");
  TORCH_CHECK(slot >= 0 && slot < options_.micro_batch_slots, "activation offload: micro-batch ",
              "slot ", slot, " outside the ", options_.micro_batch_slots, " planned");
  return static_cast<int64_t>(slot) * static_cast<int64_t>(options_.blocks.size()) +
         block_index_[block];
}

int ActivationOffloader::BlockOf(int64_t key) const {
  return options_.blocks[key % static_cast<int64_t>(options_.blocks.size())];
}

int ActivationOffloader::SlotOf(int64_t key) const {
  return static_cast<int>(key / static_cast<int64_t>(options_.blocks.size()));
}

std::string ActivationOffloader::Where(int64_t key) const {
  return absl::StrCat("block ", BlockOf(key), " (micro-batch slot ", SlotOf(key), ") in ",
                      tier_->path(), " (memory.disk_path)");
}

int64_t ActivationOffloader::staging_bytes() const {
  int64_t n = 0;
  for (const Buffer& b : buffers_) n += b.data != nullptr ? options_.slot_bytes : 0;
  return n;
}

int64_t ActivationOffloader::PayloadOffset(int block, int slot) const {
  return tier_->SlotOffset(Key(block, slot)) + memory::DiskTier::kSlotHeaderBytes;
}

void ActivationOffloader::FinishWrite(Buffer& b) {
  const absl::StatusOr<uint64_t> written = b.write.Wait();
  const int64_t key = b.key;
  b.state = Buffer::State::kFree;
  b.key = -1;
  b.write = memory::DiskWriteHandle();
  TORCH_CHECK(written.ok(), "activation offload: writing the activations of ", Where(key),
              " failed: ", written.status().ToString());
}

int ActivationOffloader::AcquireBuffer(bool for_prefetch) {
  // Buffers are few (two or three): linear scans are the simplest correct thing.
  for (size_t i = 0; i < buffers_.size(); ++i) {
    if (buffers_[i].state == Buffer::State::kFree) {
      if (buffers_[i].data == nullptr) buffers_[i].data.reset(new char[options_.slot_bytes]);
      return static_cast<int>(i);
    }
  }
  // A finished write first, else the write or (not for a prefetch) the read queued earliest.
  for (size_t i = 0; i < buffers_.size(); ++i) {
    if (buffers_[i].state == Buffer::State::kWriting && buffers_[i].write.done()) {
      FinishWrite(buffers_[i]);
      return static_cast<int>(i);
    }
  }
  int oldest = -1;
  for (size_t i = 0; i < buffers_.size(); ++i) {
    const Buffer& b = buffers_[i];
    if (for_prefetch && b.state == Buffer::State::kReading) continue;
    if (oldest < 0 || b.seq < buffers_[oldest].seq) oldest = static_cast<int>(i);
  }
  if (oldest < 0) return -1;
  Buffer& b = buffers_[oldest];
  if (b.state == Buffer::State::kWriting) {
    FinishWrite(b);
  } else {
    // Every buffer holds a prefetched read (a pipeline's forward among backwards): drop the
    // oldest; its block is read again when its backward comes.
    (void)b.read.Wait();
    b.state = Buffer::State::kFree;
    b.key = -1;
    b.read = memory::DiskReadHandle();
  }
  return oldest;
}

int ActivationOffloader::StartRead(int64_t key, bool for_prefetch) {
  const Record& r = records_.at(key);
  const int i = AcquireBuffer(for_prefetch);
  if (i < 0) return -1;
  Buffer& b = buffers_[i];
  b.read = tier_->ReadAsync(key, b.data.get(), r.bytes, r.generation);
  b.state = Buffer::State::kReading;
  b.seq = next_seq_++;
  b.key = key;
  return i;
}

void ActivationOffloader::Offload(int block, int slot, const std::vector<at::Tensor*>& tensors) {
  const int64_t key = Key(block, slot);
  Forget(block, slot);
  Record r;
  for (const at::Tensor* t : tensors) {
    if (!t->defined()) {
      r.shapes.emplace_back();
      continue;
    }
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(),
                "activation offload packs contiguous float32 tensors");
    r.shapes.push_back(t->sizes().vec());
  }
  r.bytes = PackedBytes(r.shapes);
  TORCH_CHECK(r.bytes <= options_.slot_bytes, "activation offload: ", Where(key), " packs ",
              r.bytes, " bytes, more than the ", options_.slot_bytes,
              " of a slot (a micro-batch larger than planned)");
  if (r.bytes == 0) return;  // nothing to keep
  const int i = AcquireBuffer(/*for_prefetch=*/false);
  Buffer& b = buffers_[i];
  int64_t offset = 0;
  for (const at::Tensor* t : tensors) {
    if (!t->defined()) continue;
    std::memcpy(b.data.get() + offset, t->data_ptr(), t->nbytes());
    offset += Aligned(static_cast<int64_t>(t->nbytes()));
  }
  b.write = tier_->WriteAsync(key, b.data.get(), r.bytes);
  b.state = Buffer::State::kWriting;
  b.seq = next_seq_++;
  b.key = key;
  // The generation the write just took (this thread is the tier's only submitter), which the
  // read will name: a slot overwritten since, or torn, then fails instead of returning its bytes.
  r.generation = tier_->generation(key);
  records_[key] = std::move(r);
  order_[slot].push_back(key);
  for (at::Tensor* t : tensors) t->reset();
}

bool ActivationOffloader::Holds(int block, int slot) const {
  if (block < 0 || static_cast<size_t>(block) >= block_index_.size() || block_index_[block] < 0 ||
      slot < 0 || slot >= options_.micro_batch_slots) {
    return false;
  }
  return records_.count(Key(block, slot)) > 0;
}

void ActivationOffloader::Restore(int block, int slot, const std::vector<at::Tensor*>& tensors) {
  const int64_t key = Key(block, slot);
  auto it = records_.find(key);
  TORCH_CHECK(it != records_.end(), "activation offload: ", Where(key), " holds nothing");
  const Record& r = it->second;
  TORCH_CHECK(r.shapes.size() == tensors.size(), "activation offload: ", Where(key), " has ",
              r.shapes.size(), " tensors, restored into ", tensors.size());
  // A write still carrying this block reports its own failure (disk full) rather than the read's.
  for (Buffer& b : buffers_) {
    if (b.state == Buffer::State::kWriting && b.key == key) FinishWrite(b);
  }
  int i = -1;
  for (size_t j = 0; j < buffers_.size(); ++j) {
    if (buffers_[j].state == Buffer::State::kReading && buffers_[j].key == key) i = static_cast<int>(j);
  }
  if (i < 0) i = StartRead(key, /*for_prefetch=*/false);
  Buffer& b = buffers_[i];
  const absl::Status read = b.read.Wait();
  b.state = Buffer::State::kFree;
  b.key = -1;
  b.read = memory::DiskReadHandle();
  std::deque<int64_t>& order = order_[slot];
  if (!read.ok()) {
    records_.erase(it);
    order.erase(std::remove(order.begin(), order.end(), key), order.end());
    TORCH_CHECK(false, "activation offload: reading the activations of ", Where(key),
                " back failed: ", read.ToString());
  }
  int64_t offset = 0;
  for (size_t k = 0; k < tensors.size(); ++k) {
    if (r.shapes[k].empty()) {
      tensors[k]->reset();
      continue;
    }
    *tensors[k] = at::empty(r.shapes[k], at::kFloat);
    std::memcpy(tensors[k]->data_ptr(), b.data.get() + offset, tensors[k]->nbytes());
    offset += Aligned(static_cast<int64_t>(tensors[k]->nbytes()));
  }
  records_.erase(it);
  order.erase(std::remove(order.begin(), order.end(), key), order.end());
  // The block whose backward comes next is the one offloaded before this one.
  PrefetchNewest(slot);
}

void ActivationOffloader::Forget(int block, int slot) {
  const int64_t key = Key(block, slot);
  if (records_.erase(key) == 0) return;
  for (Buffer& b : buffers_) {
    if (b.state == Buffer::State::kReading && b.key == key) {
      (void)b.read.Wait();  // the buffer must not be reused under a running read
      b.state = Buffer::State::kFree;
      b.key = -1;
      b.read = memory::DiskReadHandle();
    }
  }
  std::deque<int64_t>& order = order_[slot];
  order.erase(std::remove(order.begin(), order.end(), key), order.end());
}

void ActivationOffloader::PrefetchNewest(int slot) {
  TORCH_CHECK(slot >= 0 && slot < options_.micro_batch_slots, "activation offload: micro-batch ",
              "slot ", slot, " outside the ", options_.micro_batch_slots, " planned");
  if (order_[slot].empty()) return;
  const int64_t key = order_[slot].back();
  for (const Buffer& b : buffers_) {
    if (b.state == Buffer::State::kReading && b.key == key) return;
  }
  StartRead(key, /*for_prefetch=*/true);
}

void ActivationOffloader::Drain() {
  for (Buffer& b : buffers_) {
    if (b.state == Buffer::State::kWriting) FinishWrite(b);
    if (b.state == Buffer::State::kReading) (void)b.read.Wait();  // its Restore reports errors
  }
}

absl::StatusOr<double> ActivationOffloader::MeasureBandwidth(int rounds) {
  const int64_t n = std::clamp<int64_t>(rounds, 1, tier_->num_slots());
  const int64_t bytes = options_.slot_bytes;
  const int i = AcquireBuffer(/*for_prefetch=*/false);
  char* data = buffers_[i].data.get();
  // Payload bytes that are not all zeros (a file system could treat zero pages specially).
  for (int64_t k = 0; k < bytes; ++k) data[k] = static_cast<char>(k * 131 + 7);
  using Clock = std::chrono::steady_clock;
  const Clock::time_point t0 = Clock::now();
  // Writes queued together as a forward queues them; reads one at a time as backward waits for
  // them (one prefetch ahead). The same source buffer serves every write (only read from).
  std::vector<memory::DiskWriteHandle> writes;
  for (int64_t k = 0; k < n; ++k) writes.push_back(tier_->WriteAsync(k, data, bytes));
  std::vector<uint64_t> generations;
  for (memory::DiskWriteHandle& w : writes) {
    absl::StatusOr<uint64_t> g = w.Wait();
    if (!g.ok()) {
      return absl::Status(g.status().code(), absl::StrCat("memory.disk_path: the activation "
                                                          "offload's bandwidth probe: ",
                                                          g.status().message()));
    }
    generations.push_back(*g);
  }
  for (int64_t k = 0; k < n; ++k) {
    const absl::Status s = tier_->Read(k, data, bytes, generations[k]);
    if (!s.ok()) {
      return absl::Status(s.code(), absl::StrCat("memory.disk_path: the activation offload's "
                                                 "bandwidth probe: ", s.message()));
    }
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return 2.0 * static_cast<double>(n * bytes) / std::max(seconds, 1e-9);
}

}  // namespace shoal::memory