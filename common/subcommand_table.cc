#include "common/subcommand_table.h"

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace shoal {
namespace {

void PrintUsage(FILE* out, const std::string& program, const std::vector<Subcommand>& table) {
  std::fprintf(out, "Usage: %s <subcommand> [flags]   (%s <subcommand> --help: its flags)\n\n",
               program.c_str(), program.c_str());
  std::fprintf(out, "Subcommands:\n%s", FormatSubcommands(table).c_str());
}

}  // namespace

std::string FormatSubcommands(const std::vector<Subcommand>& table) {
  size_t width = 0;
  for (const Subcommand& s : table) width = std::max(width, s.name.size());
  std::string out;
  for (const Subcommand& s : table) {
    absl::StrAppend(&out, absl::StrFormat("  %-*s  %s\n", static_cast<int>(width), s.name, s.help));
  }
  return out;
}

int RunSubcommand(const std::string& program, const std::string& description,
                  const std::vector<Subcommand>& table, int argc, char** argv) {
  if (argc >= 2 && (std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0)) {
    std::printf("%s\n", description.c_str());
    PrintUsage(stdout, program, table);
    return 0;
  }
  if (argc < 2) {
    std::fprintf(stderr, "%s: error: a subcommand is required\n", program.c_str());
    PrintUsage(stderr, program, table);
    return 2;
  }
  for (const Subcommand& s : table) {
    if (s.name == argv[1]) return s.main(argc - 1, argv + 1);
  }
  std::fprintf(stderr, "%s: error: unknown subcommand '%s'\n", program.c_str(), argv[1]);
  PrintUsage(stderr, program, table);
  return 2;
}

}  // namespace shoal
