#include "launch/env.h"

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <optional>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "common/status.h"


namespace shoal::launch {
namespace {

// A guard against lists like "n[0-99999999]" that would expand into gigabytes of names.
constexpr size_t kMaxHosts = 1 << 20;

using GetEnv = std::function<const char*(const char*)>;

// The value of `name`, or nullopt when unset or empty (an empty variable is what `export X=`
// leaves behind, and no launcher sets one on purpose).
std::optional<std::string> Lookup(const GetEnv& getenv, const char* name) {
  const char* v = getenv(name);
  if (v == nullptr || *v == '\0') return std::nullopt;
  return std::string(v);
}

// A non-negative int in decimal; kInvalidArgument names the variable and its value.
absl::StatusOr<int> ParseNonNegative(const char* name, const std::string& value) {
  int64_t v = 0;
  if (!absl::SimpleAtoi(value, &v) || v < 0 || v > std::numeric_limits<int>::max()) {
    return absl::InvalidArgumentError(absl::StrCat("environment variable ", name, "='", value,
                                                   "' is not a non-negative integer"));
  }
  return static_cast<int>(v);
}

// `name` parsed, or `fallback` when unset.
absl::StatusOr<int> IntOr(const GetEnv& getenv, const char* name, int fallback) {
  std::optional<std::string> v = Lookup(getenv, name);
  if (!v) return fallback;
  return ParseNonNegative(name, *v);
}

// `name` parsed; kInvalidArgument when unset, saying which variable set alongside needs it.
absl::StatusOr<int> RequiredInt(const GetEnv& getenv, const char* name, const char* because) {
  std::optional<std::string> v = Lookup(getenv, name);
  if (!v) {
    return absl::InvalidArgumentError(
        absl::StrCat("environment variable ", name, " is not set, but ", because, " is"));
  }
  return ParseNonNegative(name, *v);
}

// SLURM_TASKS_PER_NODE's compressed form, "4(x2),3" -> {4, 4, 3}.
absl::StatusOr<std::vector<int>> ParseTasksPerNode(const char* name, const std::string& value) {
  std::vector<int> out;
  for (absl::string_view part : absl::StrSplit(value, ',')) {
    int repeat = 1;
    absl::string_view count = part;
    const size_t paren = part.find('(');
    if (paren != absl::string_view::npos) {
      count = part.substr(0, paren);
      absl::string_view rep = part.substr(paren);
      if (rep.size() < 4 || rep.substr(0, 2) != "(x" || rep.back() != ')' ||
          !absl::SimpleAtoi(rep.substr(2, rep.size() - 3), &repeat) || repeat < 1) {
        return absl::InvalidArgumentError(absl::StrCat(
            "environment variable ", name, "='", value, "' is not like '4(x2),3'"));
      }
    }
    int n = 0;
    if (!absl::SimpleAtoi(count, &n) || n < 1) {
      return absl::InvalidArgumentError(absl::StrCat("environment variable ", name, "='", value,
                                                     "' is not like '4(x2),3'"));
    }
    if (out.size() + repeat > kMaxHosts) {
      return absl::InvalidArgumentError(
          absl::StrCat("environment variable ", name, "='", value, "' names too many nodes"));
    }
    out.insert(out.end(), repeat, n);
  }
  return out;
}

// Tasks on this node under Slurm: SLURM_NTASKS_PER_NODE when --ntasks-per-node was given, else
// this node's entry of SLURM_STEP_TASKS_PER_NODE (inside srun) or SLURM_TASKS_PER_NODE.
absl::StatusOr<int> SlurmTasksOnThisNode(const GetEnv& getenv, int node_id, int world_size) {
  if (Lookup(getenv, "SLURM_NTASKS_PER_NODE")) {
    return ParseNonNegative("SLURM_NTASKS_PER_NODE", *Lookup(getenv, "SLURM_NTASKS_PER_NODE"));
  }
  for (const char* name : {"SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"}) {
    std::optional<std::string> v = Lookup(getenv, name);
    if (!v) continue;
    SHOAL_ASSIGN_OR_RETURN(std::vector<int> per_node, ParseTasksPerNode(name, *v));
    if (node_id >= static_cast<int>(per_node.size())) {
      return absl::InvalidArgumentError(absl::StrCat("SLURM_NODEID=", node_id, " but ", name,
                                                     "='", *v, "' lists ", per_node.size(),
                                                     " node(s)"));
    }
    return per_node[node_id];
  }
  return world_size;  // no per-node count: assume one node
}

absl::Status Validate(const DistributedEnv& e, const char* rank_var, const char* world_var,
                      const char* local_rank_var, const char* local_world_var) {
  if (e.world_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("environment variable ", world_var, "=", e.world_size, " must be >= 1"));
  }
  if (e.rank >= e.world_size) {
    return absl::InvalidArgumentError(absl::StrCat("environment variable ", rank_var, "=", e.rank,
                                                   " is not below ", world_var, "=",
                                                   e.world_size));
  }
  if (e.local_world_size < 1 || e.local_world_size > e.world_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "environment variable ", local_world_var, "=", e.local_world_size,
        " must be between 1 and ", world_var, "=", e.world_size));
  }
  if (e.local_rank >= e.local_world_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("environment variable ", local_rank_var, "=", e.local_rank,
                     " is not below ", local_world_var, "=", e.local_world_size));
  }
  return absl::OkStatus();
}

absl::Status ReadTorchrun(const GetEnv& getenv, DistributedEnv& e) {
  const char* which = Lookup(getenv, "RANK") ? "RANK" : "WORLD_SIZE";
  SHOAL_ASSIGN_OR_RETURN(e.rank, RequiredInt(getenv, "RANK", which));
  SHOAL_ASSIGN_OR_RETURN(e.world_size, RequiredInt(getenv, "WORLD_SIZE", which));
  // Hand-written exports often stop at RANK/WORLD_SIZE: then treat the job as one node.
  SHOAL_ASSIGN_OR_RETURN(e.local_world_size, IntOr(getenv, "LOCAL_WORLD_SIZE", e.world_size));
  SHOAL_ASSIGN_OR_RETURN(e.local_rank,
                         IntOr(getenv, "LOCAL_RANK", e.rank % std::max(1, e.local_world_size)));
  SHOAL_RETURN_IF_ERROR(Validate(e, "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"));
  SHOAL_ASSIGN_OR_RETURN(e.node_rank, IntOr(getenv, "GROUP_RANK", e.rank / e.local_world_size));
  return absl::OkStatus();
}

absl::Status ReadOpenMpi(const GetEnv& getenv, DistributedEnv& e) {
  const char* which =
      Lookup(getenv, "OMPI_COMM_WORLD_RANK") ? "OMPI_COMM_WORLD_RANK" : "OMPI_COMM_WORLD_SIZE";
  SHOAL_ASSIGN_OR_RETURN(e.rank, RequiredInt(getenv, "OMPI_COMM_WORLD_RANK", which));
  SHOAL_ASSIGN_OR_RETURN(e.world_size, RequiredInt(getenv, "OMPI_COMM_WORLD_SIZE", which));
  SHOAL_ASSIGN_OR_RETURN(e.local_world_size,
                         IntOr(getenv, "OMPI_COMM_WORLD_LOCAL_SIZE", e.world_size));
  SHOAL_ASSIGN_OR_RETURN(e.local_rank, IntOr(getenv, "OMPI_COMM_WORLD_LOCAL_RANK",
                                             e.rank % std::max(1, e.local_world_size)));
  SHOAL_RETURN_IF_ERROR(Validate(e, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                                 "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"));
  // OMPI_COMM_WORLD_NODE_RANK is a rank among the processes of a node, not the node's index;
  // mpirun's default mapping (--map-by slot) fills nodes in rank order, so divide.
  e.node_rank = e.rank / e.local_world_size;
  return absl::OkStatus();
}

// Slurm's view of local rank, tasks on this node and node index, shared by PMIx and Slurm.
absl::Status ReadSlurmLocal(const GetEnv& getenv, DistributedEnv& e, const char* rank_var,
                            const char* world_var) {
  SHOAL_ASSIGN_OR_RETURN(e.node_rank, IntOr(getenv, "SLURM_NODEID", 0));
  SHOAL_ASSIGN_OR_RETURN(e.local_world_size, SlurmTasksOnThisNode(getenv, e.node_rank,
                                                                  e.world_size));
  SHOAL_ASSIGN_OR_RETURN(e.local_rank, IntOr(getenv, "SLURM_LOCALID", 0));
  const char* local_world_var =
      Lookup(getenv, "SLURM_NTASKS_PER_NODE")       ? "SLURM_NTASKS_PER_NODE"
      : Lookup(getenv, "SLURM_STEP_TASKS_PER_NODE") ? "SLURM_STEP_TASKS_PER_NODE"
                                                    : "SLURM_TASKS_PER_NODE";
  return Validate(e, rank_var, world_var, "SLURM_LOCALID", local_world_var);
}

absl::StatusOr<int> SlurmWorldSize(const GetEnv& getenv, const char* because) {
  if (Lookup(getenv, "SLURM_NTASKS")) return IntOr(getenv, "SLURM_NTASKS", 1);
  if (Lookup(getenv, "SLURM_NPROCS")) return IntOr(getenv, "SLURM_NPROCS", 1);
  return RequiredInt(getenv, "SLURM_NTASKS", because);
}

absl::Status ReadPmix(const GetEnv& getenv, DistributedEnv& e) {
  SHOAL_ASSIGN_OR_RETURN(e.rank, ParseNonNegative("PMIX_RANK", *Lookup(getenv, "PMIX_RANK")));
  SHOAL_ASSIGN_OR_RETURN(e.world_size, SlurmWorldSize(getenv, "PMIX_RANK"));
  return ReadSlurmLocal(getenv, e, "PMIX_RANK", "SLURM_NTASKS");
}

absl::Status ReadSlurm(const GetEnv& getenv, DistributedEnv& e) {
  SHOAL_ASSIGN_OR_RETURN(e.rank,
                         ParseNonNegative("SLURM_PROCID", *Lookup(getenv, "SLURM_PROCID")));
  SHOAL_ASSIGN_OR_RETURN(e.world_size, SlurmWorldSize(getenv, "SLURM_PROCID"));
  return ReadSlurmLocal(getenv, e, "SLURM_PROCID", "SLURM_NTASKS");
}

// MASTER_ADDR, else the first host of the Slurm allocation, else 127.0.0.1; MASTER_PORT, else
// one derived from the Slurm job id (two jobs sharing a node must not collide), else 29500.
absl::Status ReadRendezvous(const GetEnv& getenv, DistributedEnv& e) {
  if (std::optional<std::string> addr = Lookup(getenv, "MASTER_ADDR")) {
    e.master_addr = *addr;
  } else {
    for (const char* name : {"SLURM_JOB_NODELIST", "SLURM_NODELIST"}) {
      std::optional<std::string> list = Lookup(getenv, name);
      if (!list) continue;
      absl::StatusOr<std::vector<std::string>> hosts = ExpandSlurmNodeList(*list);
      if (!hosts.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("environment variable ", name, ": ", hosts.status().message()));
      }
      e.master_addr = hosts->front();
      break;
    }
  }
  if (std::optional<std::string> port = Lookup(getenv, "MASTER_PORT")) {
    SHOAL_ASSIGN_OR_RETURN(e.master_port, ParseNonNegative("MASTER_PORT", *port));
    if (e.master_port < 1 || e.master_port > 65535) {
      return absl::InvalidArgumentError(
          absl::StrCat("environment variable MASTER_PORT=", *port, " is not a port (1-65535)"));
    }
  } else if (Lookup(getenv, "SLURM_JOB_ID") && e.source != "torchrun") {
    SHOAL_ASSIGN_OR_RETURN(int job, IntOr(getenv, "SLURM_JOB_ID", 0));
    e.master_port = 20000 + job % 10000;
  }
  return absl::OkStatus();
}

// "01-03" or "7" inside brackets -> names with the zero padding of the lower bound.
absl::Status ExpandRange(absl::string_view range, const std::string& list,
                         std::vector<std::string>& out) {
  const size_t dash = range.find('-');
  absl::string_view lo_s = range.substr(0, dash);
  absl::string_view hi_s = dash == absl::string_view::npos ? lo_s : range.substr(dash + 1);
  uint64_t lo = 0, hi = 0;
  auto digits = [](absl::string_view s) {
    return !s.empty() && s.find_first_not_of("0123456789") == absl::string_view::npos;
  };
  if (!digits(lo_s) || !digits(hi_s) || !absl::SimpleAtoi(lo_s, &lo) ||
      !absl::SimpleAtoi(hi_s, &hi) || lo > hi) {
    return absl::InvalidArgumentError(absl::StrCat("node list '", list, "': bad range '", range,
                                                   "' (expected like 01-03 or 7)"));
  }
  if (hi - lo >= kMaxHosts) {
    return absl::InvalidArgumentError(
        absl::StrCat("node list '", list, "': range '", range, "' is too long"));
  }
  const size_t width = lo_s.size();
  for (uint64_t i = lo; i <= hi; ++i) {
    std::string n = std::to_string(i);
    if (n.size() < width) n.insert(0, width - n.size(), '0');
    out.push_back(std::move(n));
  }
  return absl::OkStatus();
}

// One host expression without top-level commas: literal text and bracket groups, expanded as
// their cartesian product ("rack[1-2]-n[1-2]" -> rack1-n1 rack1-n2 rack2-n1 rack2-n2).
absl::Status ExpandHost(absl::string_view expr, const std::string& list,
                        std::vector<std::string>& out) {
  std::vector<std::string> names = {""};
  size_t i = 0;
  while (i < expr.size()) {
    if (expr[i] == ']') {
      return absl::InvalidArgumentError(absl::StrCat("node list '", list, "': unbalanced ']'"));
    }
    if (expr[i] != '[') {
      const size_t next = expr.find_first_of("[]", i);
      const absl::string_view lit = expr.substr(i, next - i);
      for (std::string& n : names) n.append(lit.data(), lit.size());
      i = next == absl::string_view::npos ? expr.size() : next;
      continue;
    }
    const size_t close = expr.find(']', i);
    if (close == absl::string_view::npos || expr.substr(i + 1, close - i - 1).find('[') !=
                                                 absl::string_view::npos) {
      return absl::InvalidArgumentError(absl::StrCat("node list '", list, "': unbalanced '['"));
    }
    std::vector<std::string> suffixes;
    for (absl::string_view range : absl::StrSplit(expr.substr(i + 1, close - i - 1), ',')) {
      SHOAL_RETURN_IF_ERROR(ExpandRange(range, list, suffixes));
    }
    if (names.size() * suffixes.size() > kMaxHosts) {
      return absl::InvalidArgumentError(
          absl::StrCat("node list '", list, "' expands to too many hosts"));
    }
    std::vector<std::string> product;
    product.reserve(names.size() * suffixes.size());
    for (const std::string& n : names) {
      for (const std::string& s : suffixes) product.push_back(n + s);
    }
    names = std::move(product);
    i = close + 1;
  }
  for (std::string& n : names) {
    if (n.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("node list '", list, "' has an empty name"));
    }
    out.push_back(std::move(n));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<std::string>> ExpandSlurmNodeList(const std::string& list) {
  if (list.empty()) return absl::InvalidArgumentError("node list is empty");
  std::vector<std::string> hosts;
  // Split on commas outside brackets.
  int depth = 0;
  size_t start = 0;
  for (size_t i = 0; i <= list.size(); ++i) {
    const char c = i < list.size() ? list[i] : ',';
    if (c == '[') ++depth;
    if (c == ']') --depth;
    if (depth < 0) {
      return absl::InvalidArgumentError(absl::StrCat("node list '", list, "': unbalanced ']'"));
    }
    if (c == ',' && depth == 0) {
      if (i == start) {
        return absl::InvalidArgumentError(
            absl::StrCat("node list '", list, "' has an empty name"));
      }
      SHOAL_RETURN_IF_ERROR(
          ExpandHost(absl::string_view(list).substr(start, i - start), list, hosts));
      if (hosts.size() > kMaxHosts) {
        return absl::InvalidArgumentError(
            absl::StrCat("node list '", list, "' expands to too many hosts"));
      }
      start = i + 1;
    }
  }
  if (depth != 0) {
    return absl::InvalidArgumentError(absl::StrCat("node list '", list, "': unbalanced '['"));
  }
  return hosts;
}

absl::StatusOr<DistributedEnv> DetectDistributedEnv(const GetEnv& getenv) {
  DistributedEnv e;
  if (Lookup(getenv, "RANK") || Lookup(getenv, "WORLD_SIZE")) {
    e.source = "torchrun";
    SHOAL_RETURN_IF_ERROR(ReadTorchrun(getenv, e));
  } else if (Lookup(getenv, "OMPI_COMM_WORLD_RANK") || Lookup(getenv, "OMPI_COMM_WORLD_SIZE")) {
    // Checked before Slurm: under mpirun inside sbatch, SLURM_PROCID describes mpirun's step.
    e.source = "openmpi";
    SHOAL_RETURN_IF_ERROR(ReadOpenMpi(getenv, e));
  } else if (Lookup(getenv, "PMIX_RANK")) {
    e.source = "pmix";
    SHOAL_RETURN_IF_ERROR(ReadPmix(getenv, e));
  } else if (Lookup(getenv, "SLURM_PROCID") && Lookup(getenv, "SLURM_STEP_ID")) {
    e.source = "slurm";
    SHOAL_RETURN_IF_ERROR(ReadSlurm(getenv, e));
  }
  SHOAL_RETURN_IF_ERROR(ReadRendezvous(getenv, e));
  if (Lookup(getenv, "SHOAL_RESTART_COUNT")) {
    SHOAL_ASSIGN_OR_RETURN(e.restart_count, IntOr(getenv, "SHOAL_RESTART_COUNT", 0));
  } else {
    SHOAL_ASSIGN_OR_RETURN(e.restart_count, IntOr(getenv, "TORCHELASTIC_RESTART_COUNT", 0));
  }
  return e;
}

absl::StatusOr<DistributedEnv> DetectDistributedEnv() {
  return DetectDistributedEnv([](const char* name) -> const char* { return std::getenv(name); });
}

}  // namespace shoal::launch
