// Rank discovery (launch/env.h) over a map-backed environment: every launcher's variables, the
// precedence between them when several are present (mpirun inside sbatch, torchrun under
// Slurm), Slurm host lists, and bad values named in the error.
#include "launch/env.h"

#include <gtest/gtest.h>

#include <initializer_list>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace shoal::launch {
namespace {

using Env = std::map<std::string, std::string>;

absl::StatusOr<DistributedEnv> Detect(const Env& env) {
  return DetectDistributedEnv([&env](const char* name) -> const char* {
    auto it = env.find(name);
    return it == env.end() ? nullptr : it->second.c_str();
  });
}

// The status message of a detection that must fail with kInvalidArgument.
std::string ErrorOf(const Env& env) {
  absl::StatusOr<DistributedEnv> e = Detect(env);
  EXPECT_FALSE(e.ok()) << "expected an error, got source " << e->source;
  if (e.ok()) return "";
  EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument) << e.status();
  return std::string(e.status().message());
}

// What a 2-task srun step on node "vm" of job 41 sets (docs: ENVIRONMENT.md §1.3).
Env SlurmStep(int procid) {
  return {{"SLURM_PROCID", std::to_string(procid)},
          {"SLURM_LOCALID", std::to_string(procid)},
          {"SLURM_NODEID", "0"},
          {"SLURM_NTASKS", "2"},
          {"SLURM_NPROCS", "2"},
          {"SLURM_STEP_ID", "0"},
          {"SLURM_JOB_ID", "41"},
          {"SLURM_JOB_NODELIST", "vm"},
          {"SLURM_TASKS_PER_NODE", "2"},
          {"SLURM_STEP_TASKS_PER_NODE", "2"}};
}

// Env `base` with `set` assigned over it and the variables in `erase` removed.
Env With(Env base, const Env& set, std::initializer_list<const char*> erase = {}) {
  for (const auto& [name, value] : set) base[name] = value;
  for (const char* name : erase) base.erase(name);
  return base;
}

// What a successful detection must give: only the fields a case names are compared.
struct Want {
  std::optional<std::string> source;
  std::optional<int> rank, world_size, local_rank, local_world_size, node_rank;
  std::optional<std::string> master_addr;
  std::optional<int> master_port, restart_count;

  Want& Source(std::string v) { source = std::move(v); return *this; }
  Want& Rank(int v) { rank = v; return *this; }
  Want& WorldSize(int v) { world_size = v; return *this; }
  Want& LocalRank(int v) { local_rank = v; return *this; }
  Want& LocalWorldSize(int v) { local_world_size = v; return *this; }
  Want& NodeRank(int v) { node_rank = v; return *this; }
  Want& MasterAddr(std::string v) { master_addr = std::move(v); return *this; }
  Want& MasterPort(int v) { master_port = v; return *this; }
  Want& RestartCount(int v) { restart_count = v; return *this; }
};

struct DetectCase {
  std::string name;  // the test's name: letters and digits only
  Env env;
  Want want;
};

std::vector<DetectCase> DetectCases() {
  // A 7-task step on four nodes (2, 2, 2 and 1 tasks), seen from rank 5 on the third node.
  const Env several_nodes = {
      {"SLURM_PROCID", "5"},          {"SLURM_LOCALID", "1"},
      {"SLURM_NODEID", "2"},          {"SLURM_NTASKS", "7"},
      {"SLURM_STEP_ID", "3"},         {"SLURM_JOB_ID", "123456"},
      {"SLURM_JOB_NODELIST", "node[01-03,07]"},
      {"SLURM_TASKS_PER_NODE", "3(x2),1"},  // the job's: superseded by the step's
      {"SLURM_STEP_TASKS_PER_NODE", "2(x3),1"}};
  const Env last_node = With(several_nodes, {{"SLURM_NODEID", "3"},  // the last node has one task
                                             {"SLURM_LOCALID", "0"},
                                             {"SLURM_PROCID", "6"}});
  return {
      {"NothingSetIsOneProcess", {},
       Want().Source("single").Rank(0).WorldSize(1).LocalRank(0).LocalWorldSize(1).NodeRank(0)
           .MasterAddr("127.0.0.1").MasterPort(29500).RestartCount(0)},
      {"Torchrun",
       {{"RANK", "5"},
        {"WORLD_SIZE", "8"},
        {"LOCAL_RANK", "1"},
        {"LOCAL_WORLD_SIZE", "4"},
        {"GROUP_RANK", "1"},
        {"MASTER_ADDR", "node0"},
        {"MASTER_PORT", "29512"},
        {"TORCHELASTIC_RESTART_COUNT", "2"}},
       Want().Source("torchrun").Rank(5).WorldSize(8).LocalRank(1).LocalWorldSize(4).NodeRank(1)
           .MasterAddr("node0").MasterPort(29512).RestartCount(2)},
      {"TorchrunMinimalExportsMeanOneNode", {{"RANK", "3"}, {"WORLD_SIZE", "4"}},
       Want().Source("torchrun").LocalRank(3).LocalWorldSize(4).NodeRank(0)},
      // Two nodes of two, GROUP_RANK left out: derived.
      {"TorchrunNodeRankDerivedFromLocalWorldSize",
       {{"RANK", "3"}, {"WORLD_SIZE", "4"}, {"LOCAL_WORLD_SIZE", "2"}},
       Want().LocalRank(1).NodeRank(1)},
      {"RestartCountShoalWins", {{"SHOAL_RESTART_COUNT", "3"}, {"TORCHELASTIC_RESTART_COUNT", "2"}},
       Want().RestartCount(3)},
      {"RestartCountFromTorchelastic", {{"TORCHELASTIC_RESTART_COUNT", "2"}},
       Want().RestartCount(2)},
      {"OpenMpi",
       {{"OMPI_COMM_WORLD_RANK", "3"},
        {"OMPI_COMM_WORLD_SIZE", "4"},
        {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
        {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"},
        {"OMPI_COMM_WORLD_NODE_RANK", "1"},
        {"PMIX_RANK", "3"}},
       Want().Source("openmpi").Rank(3).WorldSize(4).LocalRank(1).LocalWorldSize(2).NodeRank(1)
           .MasterAddr("127.0.0.1").MasterPort(29500)},
      // mpirun's daemons run as a one-task-per-node Slurm step: SLURM_PROCID is the daemon's.
      // The master is the allocation's first host, its port derived from the job id.
      {"MpirunInsideSbatchOpenMpiWins",
       With(SlurmStep(0), {{"SLURM_JOB_NODELIST", "gpu[07-08]"},
                           {"OMPI_COMM_WORLD_RANK", "1"},
                           {"OMPI_COMM_WORLD_SIZE", "2"},
                           {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
                           {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"},
                           {"PMIX_RANK", "1"}}),
       Want().Source("openmpi").Rank(1).LocalRank(1).MasterAddr("gpu07").MasterPort(20000 + 41)},
      {"TorchrunBeatsEverythingElse",
       With(SlurmStep(1), {{"OMPI_COMM_WORLD_RANK", "1"},
                           {"OMPI_COMM_WORLD_SIZE", "2"},
                           {"PMIX_RANK", "1"},
                           {"RANK", "6"},
                           {"WORLD_SIZE", "8"},
                           {"LOCAL_RANK", "2"},
                           {"LOCAL_WORLD_SIZE", "4"},
                           {"MASTER_ADDR", "10.0.0.1"},
                           {"MASTER_PORT", "1234"}}),
       Want().Source("torchrun").Rank(6).WorldSize(8).LocalRank(2).NodeRank(1)
           .MasterAddr("10.0.0.1").MasterPort(1234)},
      // `shoal run` under sbatch sets MASTER_PORT itself; a bare RANK/WORLD_SIZE export inside a
      // Slurm job does not get the job-derived port (that is for Slurm's own ranks).
      {"TorchrunWithoutMasterPortKeepsDefault",
       With(SlurmStep(0), {{"RANK", "0"}, {"WORLD_SIZE", "1"}}),
       Want().MasterPort(29500).MasterAddr("vm")},
      // PMIX_RANK wins even without SLURM_PROCID; check it is not needed.
      {"PmixUnderSrun", With(SlurmStep(1), {{"PMIX_RANK", "1"}}, {"SLURM_PROCID"}),
       Want().Source("pmix").Rank(1).WorldSize(2).LocalRank(1).LocalWorldSize(2).MasterAddr("vm")},
      {"PmixBeatsSlurm", With(SlurmStep(0), {{"SLURM_LOCALID", "1"}, {"PMIX_RANK", "1"}}),
       Want().Source("pmix").Rank(1)},
      {"SlurmStepOnOneNode", SlurmStep(1),
       Want().Source("slurm").Rank(1).WorldSize(2).LocalRank(1).LocalWorldSize(2).NodeRank(0)
           .MasterAddr("vm").MasterPort(20041)},
      {"SlurmStepOnSeveralNodes", several_nodes,
       Want().Rank(5).WorldSize(7).LocalRank(1).LocalWorldSize(2).NodeRank(2)
           .MasterAddr("node01").MasterPort(20000 + 123456 % 10000)},
      {"SlurmStepOnSeveralNodesLastNode", last_node, Want().LocalWorldSize(1)},
      // --ntasks-per-node, when given, is taken as is.
      {"SlurmStepOnSeveralNodesNtasksPerNode", With(last_node, {{"SLURM_NTASKS_PER_NODE", "2"}}),
       Want().LocalWorldSize(2)},
      // Outside srun the batch shell has SLURM_PROCID=0 and the job's task count, but no step.
      {"SlurmBatchScriptIsOneProcess",
       With(SlurmStep(0), {}, {"SLURM_STEP_ID", "SLURM_STEP_TASKS_PER_NODE"}),
       Want().Source("single").WorldSize(1).MasterAddr("vm")},
      {"ExplicitMasterOverridesSlurm",
       With(SlurmStep(0), {{"MASTER_ADDR", "head"}, {"MASTER_PORT", "31000"}}),
       Want().Source("slurm").MasterAddr("head").MasterPort(31000)},
      {"EmptyVariablesAreUnset",
       {{"RANK", ""}, {"WORLD_SIZE", ""}, {"MASTER_ADDR", ""}, {"MASTER_PORT", ""}},
       Want().Source("single").MasterAddr("127.0.0.1")},
  };
}

class DetectDistributedEnvCase : public ::testing::TestWithParam<DetectCase> {};

TEST_P(DetectDistributedEnvCase, Detects) {
  const DetectCase& c = GetParam();
  absl::StatusOr<DistributedEnv> e = Detect(c.env);
  ASSERT_TRUE(e.ok()) << e.status();
  const Want& want = c.want;
  if (want.source) EXPECT_EQ(e->source, *want.source);
  if (want.rank) EXPECT_EQ(e->rank, *want.rank);
  if (want.world_size) EXPECT_EQ(e->world_size, *want.world_size);
  if (want.local_rank) EXPECT_EQ(e->local_rank, *want.local_rank);
  if (want.local_world_size) EXPECT_EQ(e->local_world_size, *want.local_world_size);
  if (want.node_rank) EXPECT_EQ(e->node_rank, *want.node_rank);
  if (want.master_addr) EXPECT_EQ(e->master_addr, *want.master_addr);
  if (want.master_port) EXPECT_EQ(e->master_port, *want.master_port);
  if (want.restart_count) EXPECT_EQ(e->restart_count, *want.restart_count);
}

INSTANTIATE_TEST_SUITE_P(Launchers, DetectDistributedEnvCase, ::testing::ValuesIn(DetectCases()),
                         [](const ::testing::TestParamInfo<DetectCase>& info) {
                           return info.param.name;
                         });

TEST(DetectDistributedEnv, BadValuesNameTheVariable) {
  struct Case {
    Env env;
    std::string needle;
  };
  const std::vector<Case> cases = {
      {{{"RANK", "one"}, {"WORLD_SIZE", "2"}}, "RANK='one'"},
      {{{"RANK", "-1"}, {"WORLD_SIZE", "2"}}, "RANK='-1'"},
      {{{"RANK", "1x"}, {"WORLD_SIZE", "2"}}, "RANK='1x'"},
      {{{"RANK", "99999999999"}, {"WORLD_SIZE", "2"}}, "RANK"},
      {{{"RANK", "2"}, {"WORLD_SIZE", "2"}}, "RANK=2 is not below WORLD_SIZE=2"},
      {{{"RANK", "0"}, {"WORLD_SIZE", "0"}}, "WORLD_SIZE=0"},
      {{{"RANK", "0"}}, "WORLD_SIZE is not set"},
      {{{"WORLD_SIZE", "2"}}, "RANK is not set"},
      {{{"RANK", "1"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "2"}, {"LOCAL_WORLD_SIZE", "2"}},
       "LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2"},
      {{{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"LOCAL_WORLD_SIZE", "4"}}, "LOCAL_WORLD_SIZE=4"},
      {{{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"GROUP_RANK", "x"}}, "GROUP_RANK"},
      {{{"MASTER_PORT", "http"}}, "MASTER_PORT='http'"},
      {{{"MASTER_PORT", "0"}}, "MASTER_PORT=0"},
      {{{"MASTER_PORT", "70000"}}, "MASTER_PORT=70000"},
      {{{"OMPI_COMM_WORLD_RANK", "2"}, {"OMPI_COMM_WORLD_SIZE", "2"}},
       "OMPI_COMM_WORLD_RANK=2 is not below OMPI_COMM_WORLD_SIZE=2"},
      {{{"OMPI_COMM_WORLD_RANK", "0"}}, "OMPI_COMM_WORLD_SIZE is not set"},
      {{{"OMPI_COMM_WORLD_RANK", "0"}, {"OMPI_COMM_WORLD_SIZE", "two"}},
       "OMPI_COMM_WORLD_SIZE='two'"},
      {{{"PMIX_RANK", "r"}, {"SLURM_NTASKS", "2"}}, "PMIX_RANK='r'"},
      {{{"PMIX_RANK", "0"}}, "SLURM_NTASKS"},  // PMIx needs the task count
      {{{"SLURM_PROCID", "x"}, {"SLURM_STEP_ID", "0"}, {"SLURM_NTASKS", "2"}}, "SLURM_PROCID"},
      {{{"SLURM_PROCID", "2"}, {"SLURM_STEP_ID", "0"}, {"SLURM_NTASKS", "2"}},
       "SLURM_PROCID=2 is not below SLURM_NTASKS=2"},
      {{{"SLURM_PROCID", "0"},
        {"SLURM_STEP_ID", "0"},
        {"SLURM_NTASKS", "2"},
        {"SLURM_TASKS_PER_NODE", "2(y2)"}},
       "SLURM_TASKS_PER_NODE='2(y2)'"},
      {{{"SLURM_PROCID", "0"},
        {"SLURM_STEP_ID", "0"},
        {"SLURM_NTASKS", "2"},
        {"SLURM_NODEID", "3"},
        {"SLURM_TASKS_PER_NODE", "1(x2)"}},
       "SLURM_NODEID=3"},
      {{{"SLURM_PROCID", "0"}, {"SLURM_STEP_ID", "0"}, {"SLURM_NTASKS", "2"},
        {"SLURM_LOCALID", "5"}},
       "SLURM_LOCALID=5"},
      {{{"SLURM_JOB_NODELIST", "node[1-"}}, "SLURM_JOB_NODELIST"},
      {{{"SHOAL_RESTART_COUNT", "again"}}, "SHOAL_RESTART_COUNT='again'"},
      {{{"TORCHELASTIC_RESTART_COUNT", "-2"}}, "TORCHELASTIC_RESTART_COUNT='-2'"},
  };
  for (const Case& c : cases) {
    const std::string m = ErrorOf(c.env);
    EXPECT_NE(m.find(c.needle), std::string::npos)
        << "expected '" << c.needle << "' in: " << m;
  }
}

TEST(DetectDistributedEnv, ProcessEnvironment) {
  // The no-argument form reads the real environment; whatever ctest runs under, it must
  // either succeed or name a variable, and never crash.
  absl::StatusOr<DistributedEnv> e = DetectDistributedEnv();
  if (!e.ok()) {
    EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument);
  }
}

using Hosts = std::vector<std::string>;

Hosts Expand(const std::string& list) {
  absl::StatusOr<Hosts> h = ExpandSlurmNodeList(list);
  EXPECT_TRUE(h.ok()) << list << ": " << h.status();
  return h.ok() ? *h : Hosts{};
}

TEST(ExpandSlurmNodeList, CommonForms) {
  EXPECT_EQ(Expand("vm"), Hosts({"vm"}));
  EXPECT_EQ(Expand("a,b"), Hosts({"a", "b"}));
  EXPECT_EQ(Expand("node[01-03,07]"), Hosts({"node01", "node02", "node03", "node07"}));
  EXPECT_EQ(Expand("node[01-03,07],gpu5"),
            Hosts({"node01", "node02", "node03", "node07", "gpu5"}));
  EXPECT_EQ(Expand("x[1-2]y"), Hosts({"x1y", "x2y"}));
  EXPECT_EQ(Expand("n[8-11]"), Hosts({"n8", "n9", "n10", "n11"}));
  EXPECT_EQ(Expand("n[098-101]"), Hosts({"n098", "n099", "n100", "n101"}));
  EXPECT_EQ(Expand("r[1-2]n[1-2]"), Hosts({"r1n1", "r1n2", "r2n1", "r2n2"}));
  EXPECT_EQ(Expand("a[1],b[2-3],c"), Hosts({"a1", "b2", "b3", "c"}));
  EXPECT_EQ(Expand("host-1.example.org"), Hosts({"host-1.example.org"}));
}

TEST(ExpandSlurmNodeList, BadListsAreNamed) {
  for (const std::string list :
       {"", "n[", "n]", "n[1-2", "n[3-1]", "n[a-b]", "n[1-]", "n[]", "a,,b", ",a", "a,",
        "n[1-2]]", "n[[1-2]]", "n[0-99999999]", "n[1-2,]"}) {
    absl::StatusOr<Hosts> h = ExpandSlurmNodeList(list);
    ASSERT_FALSE(h.ok()) << "'" << list << "' expanded to " << h->size() << " hosts";
    EXPECT_EQ(h.status().code(), absl::StatusCode::kInvalidArgument);
    if (!list.empty()) {
      EXPECT_NE(h.status().message().find(list), std::string::npos) << h.status();
    }
  }
}

}  // namespace
}  // namespace shoal::launch
