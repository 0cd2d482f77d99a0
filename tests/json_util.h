// Reading the JSON result lines that shoal's benchmarks and status commands print.
#ifndef SHOAL_TESTS_JSON_UTIL_H_
#define SHOAL_TESTS_JSON_UTIL_H_

#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "tests/test_util.h"

namespace shoal::testing {

// The last line of `text` that parses as a JSON object (from its first '{', so a launcher's
// "[rank0]: " prefix does not matter); null when there is none.
inline nlohmann::json LastJsonLine(const std::string& text) {
  nlohmann::json last;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    const std::string line = text.substr(start, end - start);
    const size_t brace = line.find('{');
    if (brace != std::string::npos) {
      auto j = nlohmann::json::parse(line.substr(brace), nullptr, /*allow_exceptions=*/false);
      if (j.is_object()) last = j;
    }
    start = end + 1;
  }
  return last;
}

// The per-step losses ("step_loss" of every "train" record) of a metrics.jsonl file, or with
// `kind` = "val" the validation losses.
inline std::vector<double> StepLosses(const std::string& metrics_path,
                                      const std::string& kind = "train") {
  std::vector<double> out;
  std::istringstream in(ReadTextFile(metrics_path));
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (j["kind"] != kind) continue;
    out.push_back(j[kind == "train" ? "step_loss" : "val_loss"].get<double>());
  }
  return out;
}

// A number as proto3 JSON prints it: 64-bit integers come as strings; 0 for anything else.
inline double JsonNumber(const nlohmann::json& j) {
  if (j.is_number()) return j.get<double>();
  if (j.is_string()) return std::stod(j.get<std::string>());
  return 0;
}

}  // namespace shoal::testing

#endif  // SHOAL_TESTS_JSON_UTIL_H_
