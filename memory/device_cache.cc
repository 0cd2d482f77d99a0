#include "memory/device_cache.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"

namespace shoal::memory {

HostDeviceBackend::~HostDeviceBackend() { std::free(memory_); }

absl::StatusOr<void*> HostDeviceBackend::Allocate(int64_t bytes, int /*num_events*/) {
  if (memory_ != nullptr) return absl::FailedPreconditionError("host backend: allocated twice");
  constexpr int64_t kAlign = 64;
  memory_ = std::aligned_alloc(kAlign, (bytes + kAlign - 1) / kAlign * kAlign);
  if (memory_ == nullptr) {
    return absl::ResourceExhaustedError(absl::StrCat("host backend: cannot allocate ", bytes,
                                                     " bytes of chunk slots"));
  }
  return memory_;
}

absl::Status HostDeviceBackend::CopyIn(void* device_dst, const void* host_src, int64_t bytes) {
  std::memcpy(device_dst, host_src, bytes);
  return absl::OkStatus();
}

absl::Status HostDeviceBackend::CopyOut(void* host_dst, const void* device_src, int64_t bytes) {
  std::memcpy(host_dst, device_src, bytes);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<DeviceChunkCache>> DeviceChunkCache::Create(
    DeviceCacheOptions options, std::unique_ptr<DeviceBackend> backend) {
  if (backend == nullptr) return absl::InvalidArgumentError("device cache: no backend");
  if (options.chunk_bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("device cache: chunk_bytes must be > 0, got ", options.chunk_bytes));
  }
  if (options.homes.empty()) return absl::InvalidArgumentError("device cache: no chunks (homes)");
  for (size_t i = 0; i < options.homes.size(); ++i) {
    if (options.homes[i] == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("device cache: chunk ", i, "'s home is null"));
    }
  }
  if (options.budget_bytes < options.chunk_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("device cache: a device budget of ", options.budget_bytes,
                     " bytes holds no chunk of ", options.chunk_bytes, " bytes"));
  }
  if (options.prefetch_depth < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "device cache: prefetch_depth must be >= 0, got ", options.prefetch_depth));
  }
  // More slots than chunks would hold nothing.
  const int capacity = static_cast<int>(std::min<int64_t>(
      options.budget_bytes / options.chunk_bytes, static_cast<int64_t>(options.homes.size())));
  std::unique_ptr<DeviceChunkCache> cache(
      new DeviceChunkCache(std::move(options), std::move(backend), capacity));
  SHOAL_ASSIGN_OR_RETURN(void* base,
                         cache->backend_->Allocate(capacity * cache->options_.chunk_bytes,
                                                   3 * capacity));
  cache->base_ = static_cast<char*>(base);
  cache->stats_.slot_bytes = capacity * cache->options_.chunk_bytes;
  return cache;
}

DeviceChunkCache::DeviceChunkCache(DeviceCacheOptions options,
                                   std::unique_ptr<DeviceBackend> backend, int capacity)
    : options_(std::move(options)), backend_(std::move(backend)), capacity_(capacity) {
  const size_t n = options_.homes.size();
  slot_of_.assign(n, -1);
  pins_.assign(n, 0);
  dirty_.assign(n, false);
  pending_.assign(n, false);
  chunk_in_.assign(capacity_, -1);
  released_once_.assign(capacity_, false);
  written_once_.assign(capacity_, false);
  written_from_.assign(n, -1);
  for (int s = capacity_ - 1; s >= 0; --s) free_slots_.push_back(s);
}

DeviceChunkCache::~DeviceChunkCache() {
  // Copies still queued read or write the caller's homes: finish them before the caller frees
  // those. The backend frees the slots.
  (void)backend_->SynchronizeCopies();
}

const EvictionPolicy& DeviceChunkCache::policy() const {
  if (farthest_ != nullptr) return *farthest_;
  return lru_;
}

int64_t DeviceChunkCache::NextUse(int chunk) const {
  if (!table_.has_value()) return kNeverUsed;
  if (moment_ < 0) return table_->FirstUse(chunk);
  return table_->NextUse(chunk, moment_);
}

absl::Status DeviceChunkCache::SetTrace(absl::Span<const int> trace) {
  for (size_t t = 0; t < trace.size(); ++t) {
    if (trace[t] < 0 || trace[t] >= num_chunks()) {
      return absl::InvalidArgumentError(absl::StrCat("device cache trace: moment ", t,
                                                     " names chunk ", trace[t], ", not in [0, ",
                                                     num_chunks(), ")"));
    }
  }
  SHOAL_ASSIGN_OR_RETURN(NextUseTable table, NextUseTable::Build(trace));
  table_.emplace(std::move(table));
  farthest_ = std::make_unique<FarthestNextUsePolicy>(&*table_);
  moment_ = -1;
  return absl::OkStatus();
}

void DeviceChunkCache::AdvanceMoment(int chunk) {
  const int64_t length = table_->length();
  const int64_t expected = (moment_ + 1) % length;
  if (table_->trace()[expected] == chunk) {
    moment_ = expected;
    return;
  }
  ++stats_.trace_misses;
  const int64_t next = NextUse(chunk);
  if (next != kNeverUsed) moment_ = next % length;  // else: a chunk the trace never names
}

absl::Status DeviceChunkCache::EvictSlot(int slot) {
  const int chunk = chunk_in_[slot];
  if (dirty_[chunk]) SHOAL_RETURN_IF_ERROR(WriteBack(slot));
  slot_of_[chunk] = -1;
  chunk_in_[slot] = -1;
  pending_[chunk] = false;
  free_slots_.push_back(slot);
  ++stats_.evictions;
  return absl::OkStatus();
}

absl::Status DeviceChunkCache::WriteBack(int slot) {
  const int chunk = chunk_in_[slot];
  // The slot's last kernels must finish before its bytes are read.
  SHOAL_RETURN_IF_ERROR(backend_->OutWaits(released_event(slot)));
  SHOAL_RETURN_IF_ERROR(
      backend_->CopyOut(options_.homes[chunk], slot_address(slot), options_.chunk_bytes));
  SHOAL_RETURN_IF_ERROR(backend_->RecordOnOut(written_event(slot)));
  written_once_[slot] = true;
  written_from_[chunk] = slot;
  dirty_[chunk] = false;
  ++stats_.write_backs;
  stats_.bytes_out += options_.chunk_bytes;
  return absl::OkStatus();
}

absl::StatusOr<bool> DeviceChunkCache::Load(int chunk, bool prefetch) {
  if (free_slots_.empty()) {
    std::vector<int> candidates;
    std::vector<int> pinned;
    for (int s = 0; s < capacity_; ++s) {
      const int c = chunk_in_[s];
      (pins_[c] > 0 ? pinned : candidates).push_back(c);
    }
    if (candidates.empty()) {
      if (prefetch) return false;
      std::sort(pinned.begin(), pinned.end());
      return absl::ResourceExhaustedError(absl::StrCat(
          "device cache: chunk ", chunk, " cannot be made resident: all ", capacity_,
          " device slots hold acquired chunks (", absl::StrJoin(pinned, ", "), ")"));
    }
    SHOAL_ASSIGN_OR_RETURN(int victim,
                           policy().ChooseVictim(candidates, std::max<int64_t>(moment_, 0)));
    // A prefetch never displaces a chunk needed sooner than the one it brings.
    if (prefetch && NextUse(victim) <= NextUse(chunk)) return false;
    SHOAL_RETURN_IF_ERROR(EvictSlot(slot_of_[victim]));
  }
  const int slot = free_slots_.back();
  free_slots_.pop_back();
  // Before the slot is overwritten: the kernels that used it for an earlier chunk, and the copy
  // of an earlier chunk out of it. Before the home is read: this chunk's latest write-back to it.
  // (The last is implied today, since an evicted slot is reloaded at once and the in queue keeps
  // order; it is kept so that correctness does not rest on that. Waiting on an event's later
  // recording waits longer: always safe.)
  if (released_once_[slot]) SHOAL_RETURN_IF_ERROR(backend_->InWaits(released_event(slot)));
  if (written_once_[slot]) SHOAL_RETURN_IF_ERROR(backend_->InWaits(written_event(slot)));
  if (written_from_[chunk] >= 0 && written_from_[chunk] != slot) {
    SHOAL_RETURN_IF_ERROR(backend_->InWaits(written_event(written_from_[chunk])));
  }
  SHOAL_RETURN_IF_ERROR(
      backend_->CopyIn(slot_address(slot), options_.homes[chunk], options_.chunk_bytes));
  SHOAL_RETURN_IF_ERROR(backend_->RecordOnIn(ready_event(slot)));
  slot_of_[chunk] = slot;
  chunk_in_[slot] = chunk;
  pending_[chunk] = true;
  dirty_[chunk] = false;
  stats_.bytes_in += options_.chunk_bytes;
  if (prefetch) ++stats_.prefetches;
  stats_.max_resident =
      std::max(stats_.max_resident, capacity_ - static_cast<int>(free_slots_.size()));
  return true;
}

absl::StatusOr<void*> DeviceChunkCache::Acquire(int chunk) {
  if (chunk < 0 || chunk >= num_chunks()) {
    return absl::OutOfRangeError(
        absl::StrCat("device cache: chunk ", chunk, " not in [0, ", num_chunks(), ")"));
  }
  ++stats_.acquires;
  if (table_.has_value()) AdvanceMoment(chunk);
  lru_.OnAccess(chunk);
  if (slot_of_[chunk] >= 0) {
    ++stats_.hits;
  } else {
    SHOAL_ASSIGN_OR_RETURN(bool loaded, Load(chunk, /*prefetch=*/false));
    (void)loaded;  // a demand load either succeeds or returns an error
    ++stats_.demand_loads;
  }
  const int slot = slot_of_[chunk];
  if (pending_[chunk]) {
    SHOAL_RETURN_IF_ERROR(backend_->ComputeWaits(ready_event(slot)));
    pending_[chunk] = false;
  }
  ++pins_[chunk];
  // Prefetch the next accesses of the trace while this chunk is in use.
  if (table_.has_value() && table_->trace()[moment_ < 0 ? 0 : moment_] == chunk) {
    const int64_t length = table_->length();
    for (int k = 1; k <= options_.prefetch_depth && k < length; ++k) {
      const int next = table_->trace()[(moment_ + k) % length];
      if (slot_of_[next] >= 0) continue;
      SHOAL_ASSIGN_OR_RETURN(bool fetched, Load(next, /*prefetch=*/true));
      if (!fetched) break;  // later accesses would displace even nearer ones
    }
  }
  return static_cast<void*>(slot_address(slot));
}

absl::Status DeviceChunkCache::Release(int chunk, bool dirty) {
  if (chunk < 0 || chunk >= num_chunks() || pins_[chunk] <= 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("device cache: release of chunk ", chunk, ", which is not acquired"));
  }
  --pins_[chunk];
  if (dirty) dirty_[chunk] = true;
  const int slot = slot_of_[chunk];
  SHOAL_RETURN_IF_ERROR(backend_->RecordOnCompute(released_event(slot)));
  released_once_[slot] = true;
  return absl::OkStatus();
}

absl::Status DeviceChunkCache::Discard(int chunk) {
  if (chunk < 0 || chunk >= num_chunks()) {
    return absl::OutOfRangeError(
        absl::StrCat("device cache: chunk ", chunk, " not in [0, ", num_chunks(), ")"));
  }
  if (pins_[chunk] > 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("device cache: discard of chunk ", chunk, ", which is acquired"));
  }
  const int slot = slot_of_[chunk];
  if (slot < 0) return absl::OkStatus();
  dirty_[chunk] = false;
  slot_of_[chunk] = -1;
  chunk_in_[slot] = -1;
  pending_[chunk] = false;
  free_slots_.push_back(slot);
  return absl::OkStatus();
}

absl::Status DeviceChunkCache::Flush() {
  std::vector<int> acquired;
  for (int c = 0; c < num_chunks(); ++c) {
    if (pins_[c] > 0) acquired.push_back(c);
  }
  if (!acquired.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "device cache: flush while chunks are acquired (", absl::StrJoin(acquired, ", "), ")"));
  }
  for (int s = 0; s < capacity_; ++s) {
    const int c = chunk_in_[s];
    if (c >= 0 && dirty_[c]) SHOAL_RETURN_IF_ERROR(WriteBack(s));
  }
  return backend_->SynchronizeCopies();
}

}  // namespace shoal::memory
