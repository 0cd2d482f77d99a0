// The link to the coordinator in a binary built without it (SHOAL_COORDINATOR off: no gRPC):
// `shoal train --coordinator` is refused at once, naming why. No link ever exists, so the other
// members are never reached; they are defined for the linker.
#include "absl/status/status.h"
#include "launch/worker_link.h"

namespace shoal::launch {

struct WorkerLink::Impl {};

absl::StatusOr<std::unique_ptr<WorkerLink>> WorkerLink::Start(const WorkerLinkOptions& options,
                                                              const runtime::Config&,
                                                              const DistributedEnv&,
                                                              comm::Backend*,
                                                              std::atomic<bool>*) {
  return absl::InvalidArgumentError(
      "--coordinator " + options.coordinator +
      ": this shoal was built without the coordinator (SHOAL_COORDINATOR: gRPC, prometheus-cpp "
      "and cpp-httplib were not found, or it was switched off at configure); train without "
      "--coordinator, or rebuild with them");
}

WorkerLink::WorkerLink(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
WorkerLink::~WorkerLink() = default;
void WorkerLink::OnStep(const runtime::StepReport&) {}
void WorkerLink::Close(const std::string&) {}
parallel::Layout WorkerLink::layout() const { return {}; }
bool WorkerLink::drained() const { return false; }

}  // namespace shoal::launch
