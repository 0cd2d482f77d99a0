// How the C library's allocator treats freed host memory in shoal's processes.
//
// glibc hands a block of more than 128 KiB to the kernel (mmap) and takes it back when it is
// freed (munmap); it also trims free memory off its heaps past a threshold that follows those
// sizes. A loop that allocates and frees the same large tensors every step (DeMo's compression
// and update, a swarm round's buffers) therefore faults every page of them in anew each time.
// Where a page fault is dear (a virtual machine, memory the host reclaims), that can cost more
// than the arithmetic: a DeMo step of configs/small.toml took 1.75 s here instead of 1.39 s
// (`shoal bench allocator`, docs/benchmarks.md). LibTorch's CPU allocator caches nothing, so the
// policy is the C library's.
//
// "keep" (the default): blocks up to 32 MiB (the most glibc allows) come from the heaps, and a
// heap keeps up to 256 MiB of free memory before it gives any back, so the next step reuses
// pages already mapped. Memory freed after a peak is held up to that bound; the peak itself is
// what the program allocates (`shoal bench allocator` reports both arms' peak RSS). "system": glibc's own defaults. Chosen by SHOAL_HOST_ALLOCATOR; glibc's own settings
// (MALLOC_*_ variables, GLIBC_TUNABLES naming glibc.malloc) win over it.
#ifndef SHOAL_COMMON_HOST_ALLOCATOR_H_
#define SHOAL_COMMON_HOST_ALLOCATOR_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace shoal {

enum class HostAllocatorPolicy { kKeep, kSystem };

inline constexpr int64_t kKeptBlockBytes = int64_t{32} << 20;  // M_MMAP_THRESHOLD
inline constexpr int64_t kKeptFreeBytes = int64_t{256} << 20;  // M_TRIM_THRESHOLD

// The policy the environment asks for: SHOAL_HOST_ALLOCATOR ("keep", "system"; unset or empty:
// "keep"), or kSystem where glibc's own malloc settings are set (the user tuned it). Values are
// passed in (null: unset) so the choice can be tested. kInvalidArgument naming the variable
// for any other value.
absl::StatusOr<HostAllocatorPolicy> ChooseHostAllocatorPolicy(
    const char* shoal_host_allocator, const char* glibc_tunables,
    bool malloc_variables_set);

// The same, from this process's environment.
absl::StatusOr<HostAllocatorPolicy> HostAllocatorPolicyFromEnvironment();

// Whether any of glibc's malloc variables (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_,
// MALLOC_TOP_PAD_, MALLOC_MMAP_MAX_) is set in this process's environment.
bool MallocVariablesSet();

// Applies `policy` to this process (glibc only; elsewhere a no-op). Returns what was done, for
// the log; a setting glibc refuses is reported there, not failed: the run goes on with glibc's
// defaults.
std::string ApplyHostAllocatorPolicy(HostAllocatorPolicy policy);

// What the last ApplyHostAllocatorPolicy in this process did ("host allocator: not set" before
// any), for the lines that describe a training process.
std::string AppliedHostAllocator();

}  // namespace shoal

#endif  // SHOAL_COMMON_HOST_ALLOCATOR_H_
