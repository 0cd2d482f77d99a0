// A program's subcommands as one table of (name, one-line help, main): `shoal <name> ...` and
// `shoal bench <name> ...` dispatch through it, and their `--help` lists it, so a subcommand is
// added in one place. Each main parses its own flags.
#ifndef SHOAL_COMMON_SUBCOMMAND_TABLE_H_
#define SHOAL_COMMON_SUBCOMMAND_TABLE_H_

#include <functional>
#include <string>
#include <vector>

namespace shoal {

struct Subcommand {
  std::string name;
  std::string help;  // one line, for the listing
  // argv starts at the subcommand's name; returns the process's exit code.
  std::function<int(int argc, char** argv)> main;
};

// Runs the subcommand that argv[1] names with (argc - 1, argv + 1) and returns its exit code.
// argv[0] is the program, or the parent subcommand, whose full name is `program` ("shoal",
// "shoal bench"). `--help` / `-h`: prints `description`, the usage and the table to stdout and
// returns 0. No name, an unknown one, or another flag: prints "<program>: error: ..." and the
// table to stderr and returns 2 (a usage error).
int RunSubcommand(const std::string& program, const std::string& description,
                  const std::vector<Subcommand>& table, int argc, char** argv);

// The table as the listing prints it: one "  name   help" line per subcommand.
std::string FormatSubcommands(const std::vector<Subcommand>& table);

}  // namespace shoal

#endif  // SHOAL_COMMON_SUBCOMMAND_TABLE_H_
