#include "common/host_allocator.h"

#include <cstdlib>
#include <string_view>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace shoal {
namespace {

absl::Mutex applied_mu(absl::kConstInit);
std::string* applied ABSL_GUARDED_BY(applied_mu) = nullptr;

std::string Apply(HostAllocatorPolicy policy) {
  if (policy == HostAllocatorPolicy::kSystem) return "host allocator: the C library's defaults";
#if defined(__GLIBC__)
  // Either setting also stops glibc's moving threshold, and a trim threshold alone would leave
  // every block over 128 KiB to mmap: the block size first, the trim only once it took.
  if (mallopt(M_MMAP_THRESHOLD, static_cast<int>(kKeptBlockBytes)) != 1) {
    return "host allocator: glibc refused M_MMAP_THRESHOLD; its defaults stay";
  }
  if (mallopt(M_TRIM_THRESHOLD, static_cast<int>(kKeptFreeBytes)) != 1) {
    return absl::StrCat("host allocator: blocks up to ", kKeptBlockBytes >> 20,
                        " MiB from the heaps; glibc refused M_TRIM_THRESHOLD");
  }
  return absl::StrCat("host allocator: blocks up to ", kKeptBlockBytes >> 20,
                      " MiB from the heaps, up to ", kKeptFreeBytes >> 20,
                      " MiB of freed memory kept for reuse");
#else
  return "host allocator: not glibc; its defaults stay";
#endif
}

}  // namespace

absl::StatusOr<HostAllocatorPolicy> ChooseHostAllocatorPolicy(const char* shoal_host_allocator,
                                                              const char* glibc_tunables,
                                                              bool malloc_variables_set) {
  HostAllocatorPolicy wanted = HostAllocatorPolicy::kKeep;
  const std::string_view v = shoal_host_allocator != nullptr ? shoal_host_allocator : "";
  if (v == "system") {
    wanted = HostAllocatorPolicy::kSystem;
  } else if (!v.empty() && v != "keep") {
    return absl::InvalidArgumentError(absl::StrCat(
        "SHOAL_HOST_ALLOCATOR must be \"keep\" or \"system\" (got \"", std::string(v), "\")"));
  }
  const bool glibc_tuned =
      malloc_variables_set ||
      (glibc_tunables != nullptr &&
       std::string_view(glibc_tunables).find("glibc.malloc.") != std::string_view::npos);
  return glibc_tuned ? HostAllocatorPolicy::kSystem : wanted;
}

bool MallocVariablesSet() {
  for (const char* name : {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                           "MALLOC_MMAP_MAX_"}) {
    if (std::getenv(name) != nullptr) return true;
  }
  return false;
}

absl::StatusOr<HostAllocatorPolicy> HostAllocatorPolicyFromEnvironment() {
  return ChooseHostAllocatorPolicy(std::getenv("SHOAL_HOST_ALLOCATOR"),
                                   std::getenv("GLIBC_TUNABLES"), MallocVariablesSet());
}

std::string ApplyHostAllocatorPolicy(HostAllocatorPolicy policy) {
  std::string done = Apply(policy);
  absl::MutexLock lock(&applied_mu);
  if (applied == nullptr) applied = new std::string();  // never freed: read until exit
  *applied = done;
  return done;
}

std::string AppliedHostAllocator() {
  absl::MutexLock lock(&applied_mu);
  return applied != nullptr ? *applied : "host allocator: not set";
}

}  // namespace shoal
