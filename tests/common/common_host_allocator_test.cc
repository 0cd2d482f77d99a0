// The host allocator policy: the choice from the environment, and (glibc) its effect measured by
// glibc's own accounting (mallinfo2) and the kernel's page-fault count, each in a child process
// of its own, since the policy is the whole process's.
#include "common/host_allocator.h"

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>

#include <gtest/gtest.h>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace shoal {
namespace {

TEST(ChooseHostAllocatorPolicy, KeepUnlessAskedOtherwise) {
  EXPECT_EQ(*ChooseHostAllocatorPolicy(nullptr, nullptr, false), HostAllocatorPolicy::kKeep);
  EXPECT_EQ(*ChooseHostAllocatorPolicy("", nullptr, false), HostAllocatorPolicy::kKeep);
  EXPECT_EQ(*ChooseHostAllocatorPolicy("keep", nullptr, false), HostAllocatorPolicy::kKeep);
  EXPECT_EQ(*ChooseHostAllocatorPolicy("system", nullptr, false), HostAllocatorPolicy::kSystem);
  // Tunables of other parts of glibc leave the choice as it is.
  EXPECT_EQ(*ChooseHostAllocatorPolicy(nullptr, "glibc.pthread.rseq=0", false),
            HostAllocatorPolicy::kKeep);
}

TEST(ChooseHostAllocatorPolicy, GlibcsOwnMallocSettingsWin) {
  EXPECT_EQ(*ChooseHostAllocatorPolicy("keep", nullptr, true), HostAllocatorPolicy::kSystem);
  EXPECT_EQ(*ChooseHostAllocatorPolicy(nullptr, "glibc.malloc.trim_threshold=1048576", false),
            HostAllocatorPolicy::kSystem);
  EXPECT_EQ(*ChooseHostAllocatorPolicy(
                "keep", "glibc.pthread.rseq=0:glibc.malloc.mmap_threshold=65536", false),
            HostAllocatorPolicy::kSystem);
}

TEST(ChooseHostAllocatorPolicy, AnyOtherValueIsRefusedByName) {
  for (const char* bad : {"Keep", "jemalloc", "keep ", "0"}) {
    absl::StatusOr<HostAllocatorPolicy> p = ChooseHostAllocatorPolicy(bad, nullptr, false);
    ASSERT_FALSE(p.ok()) << bad;
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(p.status().message().find("SHOAL_HOST_ALLOCATOR"), std::string::npos);
    EXPECT_NE(p.status().message().find(bad), std::string::npos) << p.status().message();
  }
  // Refused even where glibc's settings would override it: the value is wrong either way.
  EXPECT_FALSE(ChooseHostAllocatorPolicy("bogus", "glibc.malloc.top_pad=0", true).ok());
}

TEST(AppliedHostAllocator, SaysWhatWasDone) {
  EXPECT_EQ(ApplyHostAllocatorPolicy(HostAllocatorPolicy::kSystem),
            "host allocator: the C library's defaults");
  EXPECT_EQ(AppliedHostAllocator(), "host allocator: the C library's defaults");
}

#if defined(__GLIBC__)

struct Observed {
  long mmapped_by_first = -1;  // growth of glibc's mmapped bytes over the first malloc
  long faults_on_reuse = -1;   // page faults touching every page of the second block
  long freed_kept = -1;        // free bytes glibc's arenas hold after the first free
  int applied_ok = 0;          // the policy's description says it took
};

// Where the blocks are published, so the compiler cannot drop a malloc and its free.
char* volatile g_sink = nullptr;

// Writes every page, through volatile so no store is dropped as dead before a free.
void Touch(char* block, size_t bytes) {
  volatile char* p = block;
  for (size_t i = 0; i < bytes; i += 4096) p[i] = 1;
}

long MinorFaults() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_minflt;
}

// In a child: (policy applied or not) malloc 8 MiB and touch it, free it, malloc it again and
// touch every page, counting what glibc mapped and the faults the second touch took.
Observed RunInChild(bool apply) {
  int fds[2];
  if (pipe(fds) != 0) return {};
  const pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    Observed o;
    if (apply) {
      const std::string done = ApplyHostAllocatorPolicy(HostAllocatorPolicy::kKeep);
      o.applied_ok = done.find("kept for reuse") != std::string::npos ? 1 : 0;
    }
    constexpr size_t kBytes = size_t{8} << 20;
    const long mapped0 = static_cast<long>(mallinfo2().hblkhd);
    auto* a = static_cast<char*>(std::malloc(kBytes));
    g_sink = a;
    o.mmapped_by_first = static_cast<long>(mallinfo2().hblkhd) - mapped0;
    Touch(a, kBytes);
    std::free(a);
    o.freed_kept = static_cast<long>(mallinfo2().fordblks);
    auto* b = static_cast<char*>(std::malloc(kBytes));
    g_sink = b;
    const long f0 = MinorFaults();
    Touch(b, kBytes);
    o.faults_on_reuse = MinorFaults() - f0;
    std::free(b);
    const ssize_t n = write(fds[1], &o, sizeof(o));
    _exit(n == static_cast<ssize_t>(sizeof(o)) ? 0 : 1);
  }
  close(fds[1]);
  Observed o;
  const ssize_t n = read(fds[0], &o, sizeof(o));
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  if (n != static_cast<ssize_t>(sizeof(o)) || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    return {};
  }
  return o;
}

TEST(ApplyHostAllocatorPolicy, GlibcsDefaultMapsALargeBlockAnew) {
  // The control: without the policy glibc hands an 8 MiB block to mmap.
  const Observed o = RunInChild(/*apply=*/false);
  ASSERT_GE(o.mmapped_by_first, 0) << "the child failed";
  EXPECT_GE(o.mmapped_by_first, long{8} << 20);
}

TEST(ApplyHostAllocatorPolicy, KeepReusesAFreedBlocksPages) {
  const Observed o = RunInChild(/*apply=*/true);
  ASSERT_GE(o.mmapped_by_first, 0) << "the child failed";
  EXPECT_EQ(o.applied_ok, 1);
  EXPECT_EQ(o.mmapped_by_first, 0) << "the block was mmapped";
  EXPECT_GE(o.freed_kept, long{8} << 20) << "the freed block went back to the kernel";
  // 2,048 pages touched; pages still mapped take no fault (a handful for the loop itself).
  EXPECT_LT(o.faults_on_reuse, 64);
}

#endif  // __GLIBC__

}  // namespace
}  // namespace shoal
