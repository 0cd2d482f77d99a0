// `shoal run`: a torchrun-compatible launcher for the ranks of one node. Implemented in
// launcher.cc; see RunLauncherMain for the command line.
#ifndef SHOAL_LAUNCH_LAUNCHER_H_
#define SHOAL_LAUNCH_LAUNCHER_H_

namespace shoal::launch {

// Entry point of `shoal run ...`: argv[0] is "run". Parses its own flags, starts the local ranks
// (the `shoal` binary itself with the arguments after `--`), supervises them, and returns the
// process exit code.
int RunLauncherMain(int argc, char** argv);

}  // namespace shoal::launch

#endif  // SHOAL_LAUNCH_LAUNCHER_H_
