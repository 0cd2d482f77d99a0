#include "launch/launcher.h"

#include <cstdio>

namespace shoal::launch {

int RunLauncherMain(int argc, char** argv) {
  (void)argc;
  (void)argv;
  std::fprintf(stderr, "shoal run: not built yet\n");
  return 1;
}

}  // namespace shoal::launch
