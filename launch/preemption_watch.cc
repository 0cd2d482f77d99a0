#include "launch/preemption_watch.h"

#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/net_util.h"

namespace shoal::launch {

bool IsPreemptionNotice(int status, const std::string& body) {
  if (status != 200) return false;
  const std::string text = absl::AsciiStrToLower(absl::StripAsciiWhitespace(body));
  return !text.empty() && text != "false";
}

absl::Status PreemptionWatch::Check(const PreemptionWatchOptions& options) {
  if (options.poll < absl::Milliseconds(100) || options.poll > absl::Hours(1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--preemption-poll-s must be in [0.1, 3600], got ", absl::ToDoubleSeconds(options.poll)));
  }
  if (absl::Status s = CheckHttpGet(options.url, options.headers); !s.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--preemption-url / --preemption-header: ", s.message()));
  }
  return absl::OkStatus();
}

PreemptionWatch::PreemptionWatch(PreemptionWatchOptions options, std::atomic<bool>* stop)
    : options_(std::move(options)), stop_(stop), thread_([this] { Run(); }) {}

PreemptionWatch::~PreemptionWatch() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    done_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void PreemptionWatch::Run() {
  int64_t failures = 0;
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (cv_.wait_for(lock, absl::ToChronoNanoseconds(options_.poll), [&] { return done_; })) {
        return;
      }
    }
    if (stop_->load()) return;  // stopping anyway
    absl::StatusOr<HttpReply> got =
        HttpGet(options_.url, options_.headers, std::min(options_.poll, absl::Seconds(5)));
    if (!got.ok()) {
      if (failures++ == 0) {
        SHOAL_LOG(Warning) << "preemption watch: " << got.status()
                           << " (polling on; further failures are not logged)";
      }
      continue;
    }
    if (IsPreemptionNotice(got->status, got->body)) {
      SHOAL_LOG(Warning) << "preemption notice from " << options_.url << ": "
                         << absl::StripAsciiWhitespace(got->body.substr(0, 200))
                         << "; draining as on SIGTERM";
      stop_->store(true);
      return;
    }
  }
}

}  // namespace shoal::launch
