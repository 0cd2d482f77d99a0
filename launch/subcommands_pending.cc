// TEMPORARY while the coordinator issue is in progress: weak placeholders so the binary links
// before every subcommand exists. Deleted before the issue is closed.
#include <cstdio>

#include "launch/subcommands.h"

namespace shoal::launch {
namespace {
int Pending(const char* name) {
  std::fprintf(stderr, "shoal: %s is not built yet\n", name);
  return 1;
}
}  // namespace
__attribute__((weak)) int CoordinatorMain(int, char**) { return Pending("coordinator"); }
__attribute__((weak)) int StatusMain(int, char**) { return Pending("status"); }
__attribute__((weak)) int BenchCoordinatorMain(int, char**) { return Pending("bench coordinator"); }
__attribute__((weak)) int SimulateMain(int, char**) { return Pending("simulate"); }
__attribute__((weak)) int ProfileMain(int, char**) { return Pending("profile"); }
}  // namespace shoal::launch
