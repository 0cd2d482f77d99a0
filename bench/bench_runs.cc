#include "bench/bench_runs.h"

#include <cstdio>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace shoal::bench {

absl::Status RunEchoing(const std::string& command,
                        const std::function<void(const std::string& line)>& on_line) {
  FILE* p = ::popen((command + " 2>&1").c_str(), "r");
  if (p == nullptr) return absl::InternalError("cannot run: " + command);
  char buf[8192];
  while (std::fgets(buf, sizeof(buf), p) != nullptr) {
    std::fputs(buf, stderr);
    if (on_line) on_line(buf);
  }
  const int status = ::pclose(p);
  if (status != 0) {
    return absl::InternalError(absl::StrCat("benchmark run failed (status ", status, "): ", command));
  }
  return absl::OkStatus();
}

absl::StatusOr<nlohmann::json> RunForJson(const std::string& command) {
  nlohmann::json last;
  SHOAL_RETURN_IF_ERROR(RunEchoing(command, [&](const std::string& line) {
    const size_t brace = line.find('{');
    if (brace == std::string::npos) return;
    auto j = nlohmann::json::parse(line.substr(brace), nullptr, /*allow_exceptions=*/false);
    if (j.is_object() && j.contains("tokens_per_s")) last = j;
  }));
  if (last.is_null()) {
    return absl::InternalError(absl::StrCat("benchmark run printed no result line: ", command));
  }
  return last;
}

int ReportFailure(const BenchHost& host, const absl::Status& status) {
  std::fprintf(stderr, "shoal: error: %s\n", std::string(status.message()).c_str());
  return host.exit_code(status);
}

int ParseAndRun(CLI::App& app, int argc, char** argv, const BenchHost& host,
                const std::function<absl::Status()>& run) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;  // CLI11's parse errors are usage errors; --help is 0
  }
  const absl::Status s = run();
  return s.ok() ? 0 : ReportFailure(host, s);
}

}  // namespace shoal::bench
