// Rank discovery (launch/env.h) over a map-backed environment: every launcher's variables, the
// precedence between them when several are present (mpirun inside sbatch, torchrun under
// Slurm), Slurm host lists, and bad values named in the error.
#include "launch/env.h"

#include <gtest/gtest.h>

#include <map>
#include <string>

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

TEST(DetectDistributedEnv, NothingSetIsOneProcess) {
  absl::StatusOr<DistributedEnv> e = Detect({});
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->source, "single");
  EXPECT_EQ(e->rank, 0);
  EXPECT_EQ(e->world_size, 1);
  EXPECT_EQ(e->local_rank, 0);
  EXPECT_EQ(e->local_world_size, 1);
  EXPECT_EQ(e->node_rank, 0);
  EXPECT_EQ(e->master_addr, "127.0.0.1");
  EXPECT_EQ(e->master_port, 29500);
  EXPECT_EQ(e->restart_count, 0);
}

TEST(DetectDistributedEnv, Torchrun) {
  absl::StatusOr<DistributedEnv> e =
      Detect({{"RANK", "5"},
              {"WORLD_SIZE", "8"},
              {"LOCAL_RANK", "1"},
              {"LOCAL_WORLD_SIZE", "4"},
              {"GROUP_RANK", "1"},
              {"MASTER_ADDR", "node0"},
              {"MASTER_PORT", "29512"},
              {"TORCHELASTIC_RESTART_COUNT", "2"}});
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->source, "torchrun");
  EXPECT_EQ(e->rank, 5);
  EXPECT_EQ(e->world_size, 8);
  EXPECT_EQ(e->local_rank, 1);
  EXPECT_EQ(e->local_world_size, 4);
  EXPECT_EQ(e->node_rank, 1);
  EXPECT_EQ(e->master_addr, "node0");
  EXPECT_EQ(e->master_port, 29512);
  EXPECT_EQ(e->restart_count, 2);
}

TEST(DetectDistributedEnv, TorchrunMinimalExportsMeanOneNode) {
  absl::StatusOr<DistributedEnv> e = Detect({{"RANK", "3"}, {"WORLD_SIZE", "4"}});
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->source, "torchrun");
  EXPECT_EQ(e->local_rank, 3);
  EXPECT_EQ(e->local_world_size, 4);
  EXPECT_EQ(e->node_rank, 0);
  // Two nodes of two, GROUP_RANK left out: derived.
  e = Detect({{"RANK", "3"}, {"WORLD_SIZE", "4"}, {"LOCAL_WORLD_SIZE", "2"}});
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->local_rank, 1);
  EXPECT_EQ(e->node_rank, 1);
}

TEST(DetectDistributedEnv, RestartCountShoalWins) {
  absl::StatusOr<DistributedEnv> e =
      Detect({{"SHOAL_RESTART_COUNT", "3"}, {"TORCHELASTIC_RESTART_COUNT", "2"}});
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->restart_count, 3);
  e = Detect({{"TORCHELASTIC_RESTART_COUNT", "2"}});
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->restart_count, 2);
}

TEST(DetectDistributedEnv, OpenMpi) {
  absl::StatusOr<DistributedEnv> e = Detect({{"OMPI_COMM_WORLD_RANK", "3"},
                                             {"OMPI_COMM_WORLD_SIZE", "4"},
                                             {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
                                             {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"},
                                             {"OMPI_COMM_WORLD_NODE_RANK", "1"},
                                             {"PMIX_RANK", "3"}});
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->source, "openmpi");
  EXPECT_EQ(e->rank, 3);
  EXPECT_EQ(e->world_size, 4);
  EXPECT_EQ(e->local_rank, 1);
  EXPECT_EQ(e->local_world_size, 2);
  EXPECT_EQ(e->node_rank, 1);
  EXPECT_EQ(e->master_addr, "127.0.0.1");
  EXPECT_EQ(e->master_port, 29500);
}

TEST(DetectDistributedEnv, MpirunInsideSbatchOpenMpiWins) {
  // mpirun's daemons run as a one-task-per-node Slurm step: SLURM_PROCID is the daemon's.
  Env env = SlurmStep(0);
  env["SLURM_JOB_NODELIST"] = "gpu[07-08]";
  env["OMPI_COMM_WORLD_RANK"] = "1";
  env["OMPI_COMM_WORLD_SIZE"] = "2";
  env["OMPI_COMM_WORLD_LOCAL_RANK"] = "1";
  env["OMPI_COMM_WORLD_LOCAL_SIZE"] = "2";
  env["PMIX_RANK"] = "1";
  absl::StatusOr<DistributedEnv> e = Detect(env);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->source, "openmpi");
  EXPECT_EQ(e->rank, 1);
  EXPECT_EQ(e->local_rank, 1);
  EXPECT_EQ(e->master_addr, "gpu07");      // first host of the allocation
  EXPECT_EQ(e->master_port, 20000 + 41);  // from the job id
}

TEST(DetectDistributedEnv, TorchrunBeatsEverythingElse) {
  Env env = SlurmStep(1);
  env["OMPI_COMM_WORLD_RANK"] = "1";
  env["OMPI_COMM_WORLD_SIZE"] = "2";
  env["PMIX_RANK"] = "1";
  env["RANK"] = "6";
  env["WORLD_SIZE"] = "8";
  env["LOCAL_RANK"] = "2";
  env["LOCAL_WORLD_SIZE"] = "4";
  env["MASTER_ADDR"] = "10.0.0.1";
  env["MASTER_PORT"] = "1234";
  absl::StatusOr<DistributedEnv> e = Detect(env);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->source, "torchrun");
  EXPECT_EQ(e->rank, 6);
  EXPECT_EQ(e->world_size, 8);
  EXPECT_EQ(e->local_rank, 2);
  EXPECT_EQ(e->node_rank, 1);
  EXPECT_EQ(e->master_addr, "10.0.0.1");
  EXPECT_EQ(e->master_port, 1234);
}

TEST(DetectDistributedEnv, TorchrunWithoutMasterPortKeepsDefault) {
  // `shoal run` under sbatch sets MASTER_PORT itself; a bare RANK/WORLD_SIZE export inside a
  // Slurm job does not get the job-derived port (that is for Slurm's own ranks).
  Env env = SlurmStep(0);
  env["RANK"] = "0";
  env["WORLD_SIZE"] = "1";
  absl::StatusOr<DistributedEnv> e = Detect(env);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->master_port, 29500);
  EXPECT_EQ(e->master_addr, "vm");
}

TEST(DetectDistributedEnv, PmixUnderSrun) {
  Env env = SlurmStep(1);
  env.erase("SLURM_PROCID");  // PMIX_RANK wins even without; check it is not needed
  env["PMIX_RANK"] = "1";
  absl::StatusOr<DistributedEnv> e = Detect(env);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->source, "pmix");
  EXPECT_EQ(e->rank, 1);
  EXPECT_EQ(e->world_size, 2);
  EXPECT_EQ(e->local_rank, 1);
  EXPECT_EQ(e->local_world_size, 2);
  EXPECT_EQ(e->master_addr, "vm");
}

TEST(DetectDistributedEnv, PmixBeatsSlurm) {
  Env env = SlurmStep(0);
  env["SLURM_LOCALID"] = "1";
  env["PMIX_RANK"] = "1";
  absl::StatusOr<DistributedEnv> e = Detect(env);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->source, "pmix");
  EXPECT_EQ(e->rank, 1);
}

TEST(DetectDistributedEnv, PmixNeedsTaskCount) {
  const std::string m = ErrorOf({{"PMIX_RANK", "0"}});
  EXPECT_NE(m.find("SLURM_NTASKS"), std::string::npos) << m;
}

TEST(DetectDistributedEnv, SlurmStepOnOneNode) {
  absl::StatusOr<DistributedEnv> e = Detect(SlurmStep(1));
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->source, "slurm");
  EXPECT_EQ(e->rank, 1);
  EXPECT_EQ(e->world_size, 2);
  EXPECT_EQ(e->local_rank, 1);
  EXPECT_EQ(e->local_world_size, 2);
  EXPECT_EQ(e->node_rank, 0);
  EXPECT_EQ(e->master_addr, "vm");
  EXPECT_EQ(e->master_port, 20041);
}

TEST(DetectDistributedEnv, SlurmStepOnSeveralNodes) {
  Env env = {{"SLURM_PROCID", "5"},          {"SLURM_LOCALID", "1"},
             {"SLURM_NODEID", "2"},          {"SLURM_NTASKS", "7"},
             {"SLURM_STEP_ID", "3"},         {"SLURM_JOB_ID", "123456"},
             {"SLURM_JOB_NODELIST", "node[01-03,07]"},
             {"SLURM_TASKS_PER_NODE", "3(x2),1"},  // the job's: superseded by the step's
             {"SLURM_STEP_TASKS_PER_NODE", "2(x3),1"}};
  absl::StatusOr<DistributedEnv> e = Detect(env);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->rank, 5);
  EXPECT_EQ(e->world_size, 7);
  EXPECT_EQ(e->local_rank, 1);
  EXPECT_EQ(e->local_world_size, 2);
  EXPECT_EQ(e->node_rank, 2);
  EXPECT_EQ(e->master_addr, "node01");
  EXPECT_EQ(e->master_port, 20000 + 123456 % 10000);

  env["SLURM_NODEID"] = "3";  // the last node has one task
  env["SLURM_LOCALID"] = "0";
  env["SLURM_PROCID"] = "6";
  e = Detect(env);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->local_world_size, 1);

  env["SLURM_NTASKS_PER_NODE"] = "2";  // --ntasks-per-node, when given, is taken as is
  e = Detect(env);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->local_world_size, 2);
}

TEST(DetectDistributedEnv, SlurmBatchScriptIsOneProcess) {
  // Outside srun the batch shell has SLURM_PROCID=0 and the job's task count, but no step.
  Env env = SlurmStep(0);
  env.erase("SLURM_STEP_ID");
  env.erase("SLURM_STEP_TASKS_PER_NODE");
  absl::StatusOr<DistributedEnv> e = Detect(env);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->source, "single");
  EXPECT_EQ(e->world_size, 1);
  EXPECT_EQ(e->master_addr, "vm");
}

TEST(DetectDistributedEnv, ExplicitMasterOverridesSlurm) {
  Env env = SlurmStep(0);
  env["MASTER_ADDR"] = "head";
  env["MASTER_PORT"] = "31000";
  absl::StatusOr<DistributedEnv> e = Detect(env);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->source, "slurm");
  EXPECT_EQ(e->master_addr, "head");
  EXPECT_EQ(e->master_port, 31000);
}

TEST(DetectDistributedEnv, EmptyVariablesAreUnset) {
  absl::StatusOr<DistributedEnv> e =
      Detect({{"RANK", ""}, {"WORLD_SIZE", ""}, {"MASTER_ADDR", ""}, {"MASTER_PORT", ""}});
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->source, "single");
  EXPECT_EQ(e->master_addr, "127.0.0.1");
}

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
