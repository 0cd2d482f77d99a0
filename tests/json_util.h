// Reading the JSON result lines that shoal's benchmarks and status commands print.
#ifndef SHOAL_TESTS_JSON_UTIL_H_
#define SHOAL_TESTS_JSON_UTIL_H_

#include <nlohmann/json.hpp>
#include <string>

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

}  // namespace shoal::testing

#endif  // SHOAL_TESTS_JSON_UTIL_H_
