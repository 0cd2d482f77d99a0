#include "launch/bench_runs.h"

#include <cstdio>

#include "absl/strings/str_cat.h"

namespace shoal::launch {

absl::StatusOr<nlohmann::json> RunForJson(const std::string& command) {
  FILE* p = ::popen((command + " 2>&1").c_str(), "r");
  if (p == nullptr) return absl::InternalError("cannot run: " + command);
  char buf[8192];
  nlohmann::json last;
  while (std::fgets(buf, sizeof(buf), p) != nullptr) {
    std::fputs(buf, stderr);
    std::string line(buf);
    const size_t brace = line.find('{');
    if (brace == std::string::npos) continue;
    auto j = nlohmann::json::parse(line.substr(brace), nullptr, /*allow_exceptions=*/false);
    if (j.is_object() && j.contains("tokens_per_s")) last = j;
  }
  const int status = ::pclose(p);
  if (status != 0 || last.is_null()) {
    return absl::InternalError(absl::StrCat("benchmark run failed (status ", status, "): ", command));
  }
  return last;
}

}  // namespace shoal::launch
