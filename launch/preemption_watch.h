// PreemptionWatch: turns a cloud provider's preemption notice into the worker's drain. A thread
// polls an instance-metadata URL (plain HTTP, optional header lines such as GCP's
// "Metadata-Flavor: Google") every `poll` and, at the first notice, logs it and sets `stop`, the
// flag SIGTERM sets: a peer drains within its grace, a trainer finishes its leases and leaves.
//
// A notice is an answer 200 whose body, trimmed, is neither empty nor "false" (any case): GCP's
// `.../instance/preempted` answers "FALSE" until it says "TRUE"; AWS's
// `.../spot/instance-action` answers 404 until it gives the action as JSON. Anything else (no
// answer, another status) is not a notice; the first failed poll is logged, the rest counted.
#ifndef SHOAL_LAUNCH_PREEMPTION_WATCH_H_
#define SHOAL_LAUNCH_PREEMPTION_WATCH_H_

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"

namespace shoal::launch {

struct PreemptionWatchOptions {
  std::string url;                   // http://HOST[:PORT]/PATH
  std::vector<std::string> headers;  // "NAME: VALUE" lines sent with every poll
  absl::Duration poll = absl::Seconds(5);
};

// Whether an answer is a preemption notice (see the top of the file).
bool IsPreemptionNotice(int status, const std::string& body);

class PreemptionWatch {
 public:
  // Checks the options (kInvalidArgument names the URL, a header or the period) and starts the
  // thread. `stop` outlives the watch.
  static absl::Status Check(const PreemptionWatchOptions& options);
  PreemptionWatch(PreemptionWatchOptions options, std::atomic<bool>* stop);
  ~PreemptionWatch();  // stops the thread
  PreemptionWatch(const PreemptionWatch&) = delete;
  PreemptionWatch& operator=(const PreemptionWatch&) = delete;

 private:
  void Run();

  PreemptionWatchOptions options_;
  std::atomic<bool>* stop_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

}  // namespace shoal::launch

#endif  // SHOAL_LAUNCH_PREEMPTION_WATCH_H_
