// `shoal run` supervising real processes: the environment each rank gets, prefixed output,
// exit codes, stopping the group when one rank fails, the root-cause report, restarts with
// --resume, signal forwarding, and no orphans when the launcher dies. The workers are small
// /bin/sh scripts (through --worker-binary) and, once, `shoal env` itself.
//
// Every command runs under `timeout`, so a launcher that hangs fails its test instead of the
// suite; the only timing assertions are generous upper bounds.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "tests/test_util.h"

namespace shoal {
namespace {

using Clock = std::chrono::steady_clock;
using testing::CommandResult;
using testing::Contains;
using testing::ReadTextFile;
using testing::RunCommand;
using testing::TempDir;
using testing::WaitUntil;
using testing::WriteTextFile;

int Count(const std::string& haystack, const std::string& needle) {
  int n = 0;
  for (size_t at = haystack.find(needle); at != std::string::npos;
       at = haystack.find(needle, at + needle.size())) {
    ++n;
  }
  return n;
}

// True while `pid` exists and is not a zombie.
bool Alive(pid_t pid) {
  if (::kill(pid, 0) != 0) return false;
  const std::string stat = ReadTextFile("/proc/" + std::to_string(pid) + "/stat");
  const size_t paren = stat.rfind(')');
  return paren == std::string::npos || paren + 2 >= stat.size() || stat[paren + 2] != 'Z';
}

class RunTest : public ::testing::Test {
 protected:
  // shoal re-executes itself once when OMP_WAIT_POLICY is unset (see runtime/device_probe.h);
  // setting it here halves the start-up time of every command.
  void SetUp() override { ::setenv("OMP_WAIT_POLICY", "passive", 1); }

  // Writes a worker script and returns its path.
  std::string Script(const std::string& name, const std::string& body) {
    const std::string path = tmp_ / name;
    // wait_for FILE: a rank waits (at most 20 s) for another to get somewhere, so that a test
    // does not depend on which process the scheduler runs first.
    WriteTextFile(path, "set -u\ncd " + tmp_.path() +
                            "\nwait_for() { i=0; while [ ! -e \"$1\" ] && [ $i -lt 400 ]; do "
                            "sleep 0.05; i=$((i+1)); done; }\n" +
                            body);
    return path;
  }

  // `shoal run FLAGS -- SCRIPT ARGS` with /bin/sh as the worker, bounded by `timeout`.
  CommandResult Run(const std::string& flags, const std::string& script,
                    const std::string& args = "", const std::string& env = "") {
    return RunCommand(env + " timeout -k 5 90 " + SHOAL_BINARY + " run --worker-binary /bin/sh " +
                      flags + " -- " + script + " " + args);
  }

  CommandResult Shoal(const std::string& args, const std::string& env = "") {
    return RunCommand(env + " timeout -k 5 90 " + SHOAL_BINARY + " " + args);
  }

  // Starts `shoal run ARGS` in the background, in its own process group (as a shell's
  // foreground job would be), output to out.txt; returns its pid.
  pid_t Start(const std::string& args) {
    const std::string cmd =
        std::string("exec ") + SHOAL_BINARY + " run " + args + " >" + (tmp_ / "out.txt") + " 2>&1";
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::setpgid(0, 0);
      ::execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
      ::_exit(127);
    }
    return pid;
  }

  // Waits up to `limit` for `pid`; its exit code (128 + signal), or -1 after killing it.
  static int Wait(pid_t pid, std::chrono::seconds limit) {
    int status = 0;
    const bool done = WaitUntil([&] { return ::waitpid(pid, &status, WNOHANG) == pid; }, limit);
    if (!done) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      return -1;
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

  std::string Output() { return ReadTextFile(tmp_ / "out.txt"); }

  bool WaitForOutput(const std::string& needle, int count, std::chrono::seconds limit) {
    return WaitUntil([&] { return Count(Output(), needle) >= count; }, limit);
  }

  TempDir tmp_;
};

constexpr char kPrintEnv[] =
    "echo \"ENV rank=$RANK local=$LOCAL_RANK world=$WORLD_SIZE lws=$LOCAL_WORLD_SIZE "
    "group=$GROUP_RANK role=$ROLE_RANK master=$MASTER_ADDR:$MASTER_PORT "
    "restart=$TORCHELASTIC_RESTART_COUNT/$SHOAL_RESTART_COUNT max=$TORCHELASTIC_MAX_RESTARTS "
    "omp=${OMP_NUM_THREADS:-unset} args=$*\"\n";

TEST_F(RunTest, EachRankGetsItsEnvironment) {
  CommandResult r = Run("--nproc-per-node 3 --master-addr 127.0.0.1 --master-port 29999",
                        Script("env.sh", kPrintEnv), "", "env -u OMP_NUM_THREADS");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (int rank = 0; rank < 3; ++rank) {
    const std::string want = "[rank" + std::to_string(rank) + "]: ENV rank=" +
                             std::to_string(rank) + " local=" + std::to_string(rank) +
                             " world=3 lws=3 group=0 role=" + std::to_string(rank) +
                             " master=127.0.0.1:29999 restart=0/0 max=0 omp=1 args=\n";
    EXPECT_TRUE(Contains(r.output, want)) << want << "\n" << r.output;
  }
  EXPECT_EQ(Count(r.output, "shoal run: OMP_NUM_THREADS is not set"), 1) << r.output;
}

TEST_F(RunTest, SecondNodeRanksAndOmpThreadsKept) {
  CommandResult r =
      Run("--nnodes 2 --node-rank 1 --nproc-per-node 2 --master-addr node0 --master-port 1234",
          Script("env.sh", kPrintEnv), "", "OMP_NUM_THREADS=3");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(Contains(r.output, "[rank2]: ENV rank=2 local=0 world=4 lws=2 group=1 role=2 "
                                 "master=node0:1234 restart=0/0 max=0 omp=3"))
      << r.output;
  EXPECT_TRUE(Contains(r.output, "[rank3]: ENV rank=3 local=1 world=4 lws=2 group=1"))
      << r.output;
  EXPECT_FALSE(Contains(r.output, "OMP_NUM_THREADS is not set")) << r.output;
}

TEST_F(RunTest, RendezvousFlags) {
  const std::string env = Script("env.sh", kPrintEnv);
  CommandResult r = Run("--rdzv-endpoint somehost:4321 --rdzv-backend c10d", env);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(Contains(r.output, "master=somehost:4321")) << r.output;
  r = Run("--rdzv_endpoint somehost", env);  // underscore spelling; torchrun's default port
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(Contains(r.output, "master=somehost:29400")) << r.output;
  r = Run("", env);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(Contains(r.output, "master=127.0.0.1:29500 ")) << r.output;
  r = Run("--standalone --nproc_per_node 2", env);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(Contains(r.output, "master=127.0.0.1:")) << r.output;
  EXPECT_FALSE(Contains(r.output, "master=127.0.0.1:29500 ")) << r.output;  // a free port
  // torchrun's PET_ variables are defaults for the flags.
  r = Run("", env, "", "PET_NPROC_PER_NODE=2 PET_MASTER_PORT=4444");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(Contains(r.output, "[rank1]: ENV rank=1 local=1 world=2")) << r.output;
  EXPECT_TRUE(Contains(r.output, "master=127.0.0.1:4444")) << r.output;
}

TEST_F(RunTest, ShoalWorkersDetectTheLauncher) {
  // The default worker is the shoal binary itself; `shoal env` prints what it detected.
  CommandResult r = Shoal("run --standalone --nproc-per-node 2 -- env");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (int rank = 0; rank < 2; ++rank) {
    const std::string prefix = "[rank" + std::to_string(rank) + "]: {";
    ASSERT_TRUE(Contains(r.output, prefix)) << r.output;
    const size_t at = r.output.find(prefix);
    const std::string line = r.output.substr(at, r.output.find('\n', at) - at);
    EXPECT_TRUE(Contains(line, "\"rank\":" + std::to_string(rank))) << line;
    EXPECT_TRUE(Contains(line, "\"world_size\":2")) << line;
    EXPECT_TRUE(Contains(line, "\"local_rank\":" + std::to_string(rank))) << line;
    EXPECT_TRUE(Contains(line, "\"source\":\"torchrun\"")) << line;
    EXPECT_TRUE(Contains(line, "\"master_addr\":\"127.0.0.1\"")) << line;
  }
  // torchrun's form, without `--`.
  r = Shoal("run --nproc-per-node 1 env");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(Contains(r.output, "[rank0]: {")) << r.output;
}

TEST_F(RunTest, OutputLinesArePrefixedAndWhole) {
  // Four ranks race to print long lines on both streams; every relayed line must be one
  // rank's line, whole. The last line has no newline.
  const std::string payload(300, 'x');
  CommandResult r = Run("--nproc-per-node 4",
                        Script("chatty.sh",
                               "i=0\nwhile [ $i -lt 200 ]; do\n"
                               "  echo \"out $RANK $i " + payload + " end\"\n"
                               "  echo \"err $RANK $i " + payload + " end\" >&2\n"
                               "  i=$((i+1))\ndone\nprintf 'tail %s' $RANK\n"),
                        "", "OMP_NUM_THREADS=1");
  ASSERT_EQ(r.exit_code, 0) << r.output.substr(0, 2000);
  int lines = 0;
  size_t start = 0;
  while (start < r.output.size()) {
    size_t nl = r.output.find('\n', start);
    if (nl == std::string::npos) nl = r.output.size();
    const std::string line = r.output.substr(start, nl - start);
    start = nl + 1;
    ++lines;
    ASSERT_EQ(line.rfind("[rank", 0), 0u) << "line " << lines << ": " << line.substr(0, 200);
    const char rank = line[5];
    const std::string body = line.substr(line.find("]: ") + 3);
    if (body.rfind("tail ", 0) == 0) {
      EXPECT_EQ(body, std::string("tail ") + rank);
      continue;
    }
    ASSERT_EQ(body.substr(4, 1), std::string(1, rank)) << line.substr(0, 200);
    ASSERT_EQ(body.size(), body.find(' ', 6) + 1 + payload.size() + 4) << line.substr(0, 200);
    ASSERT_EQ(body.substr(body.size() - 4), " end") << line.substr(0, 200);
  }
  EXPECT_EQ(lines, 4 * (400 + 1));
}

TEST_F(RunTest, AllSucceedExitsZero) {
  CommandResult r = Run("--nproc-per-node 2", Script("ok.sh", "echo done $RANK\n"));
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(Contains(r.output, "[rank0]: done 0")) << r.output;
  EXPECT_TRUE(Contains(r.output, "[rank1]: done 1")) << r.output;
  EXPECT_FALSE(Contains(r.output, "FAILED")) << r.output;
}

TEST_F(RunTest, OneRankFailsTheOthersAreStopped) {
  const auto start = Clock::now();
  CommandResult r = Run("--nproc-per-node 3",
                        Script("fail.sh",
                               "if [ $RANK = 1 ]; then\n"
                               "  i=0; while [ $i -lt 15 ]; do echo \"line $i\"; i=$((i+1)); done\n"
                               "  wait_for pid0; wait_for pid2; echo 'about to fail' >&2; exit 3\n"
                               "fi\n"
                               "echo $$ > pid$RANK.tmp; mv pid$RANK.tmp pid$RANK; exec sleep 60\n"));
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  EXPECT_EQ(r.exit_code, 3) << r.output;
  EXPECT_LT(seconds, 30) << "the sleeping ranks were not stopped";
  EXPECT_TRUE(Contains(r.output, "Root Cause (first observed failure)")) << r.output;
  EXPECT_TRUE(Contains(r.output, "  rank      : 1 (local_rank: 1)\n")) << r.output;
  EXPECT_TRUE(Contains(r.output, "  exitcode  : 3 (pid: ")) << r.output;
  EXPECT_TRUE(Contains(r.output, "  host      : ")) << r.output;
  EXPECT_TRUE(Contains(r.output, "  time      : ")) << r.output;
  // The last ten lines, the stderr one included; not the first ones.
  EXPECT_TRUE(Contains(r.output, "    line 14\n    about to fail\n")) << r.output;
  EXPECT_TRUE(Contains(r.output, "    line 6\n")) << r.output;
  EXPECT_FALSE(Contains(r.output, "    line 5\n")) << r.output;
  EXPECT_TRUE(Contains(r.output, "<NO_OTHER_FAILURES>")) << r.output;
  EXPECT_TRUE(Contains(r.output, "Stopped by the launcher: rank 0 (SIGTERM), rank 2 (SIGTERM)"))
      << r.output;
  for (int rank : {0, 2}) {
    const std::string pid = ReadTextFile(tmp_ / ("pid" + std::to_string(rank)));
    ASSERT_FALSE(pid.empty()) << r.output;
    EXPECT_FALSE(Alive(std::stoi(pid))) << "rank " << rank << " still runs";
  }
}

TEST_F(RunTest, RankKilledBySignalIsReported) {
  CommandResult r = Run("--nproc-per-node 2", Script("segv.sh",
                                                     "if [ $RANK = 0 ]; then kill -SEGV $$; fi\n"
                                                     "exec sleep 60\n"));
  EXPECT_EQ(r.exit_code, 128 + SIGSEGV) << r.output;
  EXPECT_TRUE(Contains(r.output, "  rank      : 0 (local_rank: 0)")) << r.output;
  EXPECT_TRUE(Contains(r.output, "  exitcode  : -11 (SIGSEGV) (pid: ")) << r.output;
}

TEST_F(RunTest, RankIgnoringSigtermIsKilled) {
  const auto start = Clock::now();
  CommandResult r = Run("--nproc-per-node 2 --stop-grace 1",
                        Script("stubborn.sh",
                               "if [ $RANK = 1 ]; then wait_for pid0; exit 4; fi\n"
                               "trap '' TERM\necho $$ > pid0.tmp; mv pid0.tmp pid0\n"
                               "exec sleep 60\n"));
  EXPECT_EQ(r.exit_code, 4) << r.output;
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - start).count(), 30);
  EXPECT_TRUE(Contains(r.output, "Stopped by the launcher: rank 0 (SIGKILL) (some needed "
                                 "SIGKILL)"))
      << r.output;
  EXPECT_FALSE(Alive(std::stoi(ReadTextFile(tmp_ / "pid0"))));
}

TEST_F(RunTest, SeveralFailuresNameTheFirst) {
  CommandResult r = Run("--nproc-per-node 3",
                        Script("many.sh",
                               "case $RANK in 0) exit 5;; 1) sleep 60;; 2) exec sleep 60;; esac\n"));
  EXPECT_EQ(r.exit_code, 5) << r.output;
  EXPECT_TRUE(Contains(r.output, "  rank      : 0 (local_rank: 0)")) << r.output;
  EXPECT_TRUE(Contains(r.output, "  exitcode  : 5 (pid: ")) << r.output;
}

TEST_F(RunTest, RestartsWithResumeUntilSuccess) {
  // Rank 1 fails in attempts 0 and 1; attempt 2 succeeds. `$*` are the worker arguments
  // after the script: the launcher appends --resume from the first restart on.
  CommandResult r = Run("--nproc-per-node 2 --max-restarts 3",
                        Script("flaky.sh",
                               "echo \"attempt $SHOAL_RESTART_COUNT/$TORCHELASTIC_RESTART_COUNT "
                               "max $TORCHELASTIC_MAX_RESTARTS args [$*]\"\n"
                               "if [ $RANK = 1 ] && [ $SHOAL_RESTART_COUNT -lt 2 ]; then\n"
                               "  wait_for started$SHOAL_RESTART_COUNT; exit 9\n"
                               "fi\n"
                               "if [ $RANK = 0 ] && [ $SHOAL_RESTART_COUNT -lt 2 ]; then\n"
                               "  touch started$SHOAL_RESTART_COUNT; exec sleep 60\n"
                               "fi\n"),
                        "--data x");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  for (const std::string rank : {"[rank0]: ", "[rank1]: "}) {
    EXPECT_TRUE(Contains(r.output, rank + "attempt 0/0 max 3 args [--data x]\n")) << r.output;
    EXPECT_TRUE(Contains(r.output, rank + "attempt 1/1 max 3 args [--data x --resume]\n"))
        << r.output;
    EXPECT_TRUE(Contains(r.output, rank + "attempt 2/2 max 3 args [--data x --resume]\n"))
        << r.output;
  }
  EXPECT_FALSE(Contains(r.output, "attempt 3")) << r.output;
  EXPECT_EQ(Count(r.output, "worker group FAILED"), 2) << r.output;
  EXPECT_TRUE(Contains(r.output, "restarting the worker group (restart 1 of 3)")) << r.output;
  EXPECT_TRUE(Contains(r.output, "restarting the worker group (restart 2 of 3)")) << r.output;
}

TEST_F(RunTest, ResumeIsNotAddedTwice) {
  CommandResult r = Run("--max-restarts 1",
                        Script("again.sh",
                               "echo \"attempt $SHOAL_RESTART_COUNT args [$*]\"\n"
                               "[ $SHOAL_RESTART_COUNT -ge 1 ]\n"),
                        "--resume");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(Contains(r.output, "attempt 1 args [--resume]\n")) << r.output;
}

TEST_F(RunTest, RestartsRunOut) {
  CommandResult r = Run("--nproc-per-node 2 --max-restarts 1",
                        Script("broken.sh", "echo attempt $SHOAL_RESTART_COUNT; exit 7\n"));
  EXPECT_EQ(r.exit_code, 7) << r.output;
  EXPECT_EQ(Count(r.output, "worker group FAILED"), 2) << r.output;
  EXPECT_TRUE(Contains(r.output, "(attempt 2, restarts used 1 of 1)")) << r.output;
  EXPECT_TRUE(Contains(r.output, "no restarts left (1 used); exiting 7")) << r.output;
  EXPECT_FALSE(Contains(r.output, "attempt 2\n")) << r.output;
}

TEST_F(RunTest, SigtermIsForwardedAndEndsTheRun) {
  const std::string script = Script("trap.sh",
                                    "trap 'echo got TERM; exit 0' TERM\n"
                                    "echo ready\n"
                                    "while :; do sleep 0.1; done\n");
  const pid_t launcher = Start("--nproc-per-node 2 --max-restarts 2 --worker-binary /bin/sh -- " +
                               script);
  ASSERT_TRUE(WaitForOutput("]: ready", 2, std::chrono::seconds(30))) << Output();
  ::kill(launcher, SIGTERM);
  EXPECT_EQ(Wait(launcher, std::chrono::seconds(60)), 128 + SIGTERM) << Output();
  const std::string out = Output();
  EXPECT_TRUE(Contains(out, "[rank0]: got TERM")) << out;
  EXPECT_TRUE(Contains(out, "[rank1]: got TERM")) << out;
  EXPECT_TRUE(Contains(out, "received SIGTERM")) << out;
  EXPECT_FALSE(Contains(out, "restarting")) << out;  // a requested stop is not a failure
}

TEST_F(RunTest, SigintReachesWorkersOnce) {
  // A terminal's Ctrl-C goes to the launcher's process group only; the ranks get it once,
  // forwarded (shoal train takes a second signal as "exit now").
  const std::string script = Script("count.sh",
                                    "n=0\ntrap 'n=$((n+1)); echo \"INT $n\"' INT\n"
                                    "echo ready\n"
                                    "i=0; while [ $n -eq 0 ] && [ $i -lt 300 ]; do sleep 0.1; "
                                    "i=$((i+1)); done\n"
                                    "sleep 0.5\n"  // a duplicate would arrive by now
                                    "exit 0\n");
  const pid_t launcher = Start("--worker-binary /bin/sh -- " + script);
  ASSERT_TRUE(WaitForOutput("]: ready", 1, std::chrono::seconds(30))) << Output();
  ::kill(-launcher, SIGINT);  // the whole group, as a terminal does
  EXPECT_EQ(Wait(launcher, std::chrono::seconds(60)), 128 + SIGINT) << Output();
  EXPECT_TRUE(Contains(Output(), "[rank0]: INT 1")) << Output();
  EXPECT_FALSE(Contains(Output(), "INT 2")) << Output();
}

TEST_F(RunTest, SigusrOneIsForwardedWithoutRestart) {
  // Slurm's warning before the time limit: the ranks checkpoint and leave with 128 + 10; the
  // launcher passes that on and does not restart.
  const std::string script = Script("usr1.sh",
                                    "trap 'echo got USR1; exit 138' USR1\n"
                                    "echo ready\n"
                                    "while :; do sleep 0.1; done\n");
  const pid_t launcher = Start("--nproc-per-node 2 --max-restarts 2 --worker-binary /bin/sh -- " +
                               script);
  ASSERT_TRUE(WaitForOutput("]: ready", 2, std::chrono::seconds(30))) << Output();
  ::kill(launcher, SIGUSR1);
  EXPECT_EQ(Wait(launcher, std::chrono::seconds(60)), 138) << Output();
  EXPECT_EQ(Count(Output(), "]: got USR1"), 2) << Output();
  EXPECT_FALSE(Contains(Output(), "restarting")) << Output();
}

TEST_F(RunTest, SignalGraceEndsWithSigkill) {
  const std::string script = Script("deaf.sh",
                                    "trap '' TERM\necho $$ > pid$RANK\necho ready\n"
                                    "exec sleep 60\n");
  const pid_t launcher = Start("--signal-grace 1 --worker-binary /bin/sh -- " + script);
  ASSERT_TRUE(WaitForOutput("]: ready", 1, std::chrono::seconds(30))) << Output();
  ::kill(launcher, SIGTERM);
  EXPECT_EQ(Wait(launcher, std::chrono::seconds(30)), 128 + SIGTERM) << Output();
  EXPECT_TRUE(Contains(Output(), "(some after SIGKILL)")) << Output();
  EXPECT_FALSE(Alive(std::stoi(ReadTextFile(tmp_ / "pid0"))));
}

TEST_F(RunTest, KilledLauncherTakesItsRanksAlong) {
  const std::string script = Script("orphan.sh", "echo $$ > pid$RANK\necho ready\nexec sleep 60\n");
  const pid_t launcher = Start("--nproc-per-node 2 --worker-binary /bin/sh -- " + script);
  ASSERT_TRUE(WaitForOutput("]: ready", 2, std::chrono::seconds(30))) << Output();
  ::kill(launcher, SIGKILL);
  Wait(launcher, std::chrono::seconds(10));
  for (int rank : {0, 1}) {
    const pid_t pid = std::stoi(ReadTextFile(tmp_ / ("pid" + std::to_string(rank))));
    EXPECT_TRUE(WaitUntil([&] { return !Alive(pid); }, std::chrono::seconds(10)))
        << "rank " << rank << " (pid " << pid << ") outlived the launcher";
  }
}

// The path the launcher exists for: two real `shoal train` ranks over Gloo, one of them killed
// mid-run; the launcher restarts the group and the ranks resume from the newest checkpoint.
TEST_F(RunTest, TrainerRanksResumeAfterOneIsKilled) {
  WriteTextFile(tmp_ / "a.txt", testing::SyntheticText(20000));
  CommandResult prep =
      Shoal("prepare-data --no-progress --input " + (tmp_ / "a.txt") + " --out " + (tmp_ / "data"));
  ASSERT_EQ(prep.exit_code, 0) << prep.output;
  WriteTextFile(tmp_ / "c.toml",
                "[model]\nn_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 16\n"
                "vocab_size = 256\n\n[train]\nsteps = 3000\nbatch_size = 2\nlog_every = 1000\n"
                "eval_batches = 1\n\n[checkpoint]\nevery = 50\n");
  const pid_t launcher =
      Start("--standalone --nproc-per-node 2 --max-restarts 1 -- train --config " +
            (tmp_ / "c.toml") + " --set data.dir=" + (tmp_ / "data") +
            " train.out_dir=" + (tmp_ / "run"));
  ASSERT_TRUE(WaitUntil([&] { return Contains(Output(), "saved checkpoint"); },
                        std::chrono::seconds(60)))
      << Output();
  // Rank 1 is the launcher's child whose environment says RANK=1.
  pid_t rank1 = 0;
  const std::string children = ReadTextFile("/proc/" + std::to_string(launcher) + "/task/" +
                                            std::to_string(launcher) + "/children");
  for (size_t at = 0; at < children.size();) {
    const size_t end = children.find(' ', at);
    const std::string pid = children.substr(at, end - at);
    at = end == std::string::npos ? children.size() : end + 1;
    if (pid.empty()) continue;
    std::string environ = ReadTextFile("/proc/" + pid + "/environ");
    if (Contains(std::string(1, '\0') + environ, std::string(1, '\0') + "RANK=1" + '\0')) {
      rank1 = std::stoi(pid);
    }
  }
  ASSERT_NE(rank1, 0) << "no rank 1 among the launcher's children: " << children;
  ::kill(rank1, SIGKILL);
  EXPECT_EQ(Wait(launcher, std::chrono::seconds(90)), 0) << Output();
  const std::string out = Output();
  EXPECT_TRUE(Contains(out, "  rank      : 1 (local_rank: 1)")) << out;
  EXPECT_TRUE(Contains(out, "  exitcode  : -9 (SIGKILL)")) << out;
  EXPECT_TRUE(Contains(out, "restarting the worker group (restart 1 of 1)")) << out;
  EXPECT_TRUE(Contains(out, "resumed from")) << out;
  EXPECT_TRUE(Contains(out, "[rank0]: checkpoint: ")) << out;
  EXPECT_TRUE(testing::ReadTextFile(tmp_ / "run/checkpoints/step_00003000/manifest.json").size() >
              0)
      << out;
}

TEST_F(RunTest, UnexecutableWorkerFails) {
  WriteTextFile(tmp_ / "noexec", "#!/bin/sh\n");
  CommandResult r = Shoal("run --worker-binary " + (tmp_ / "noexec") + " -- x");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_TRUE(Contains(r.output, "--worker-binary")) << r.output;
}

TEST_F(RunTest, BadFlagsAreNamed) {
  struct Case {
    std::string args;
    std::string needle;
  };
  const std::vector<Case> cases = {
      {"--nproc-per-node 0 -- env", "--nproc-per-node '0'"},
      {"--nproc-per-node many -- env", "--nproc-per-node 'many'"},
      {"--nnodes 1:4 -- env", "elastic"},
      {"--nnodes x -- env", "--nnodes 'x'"},
      {"--nnodes 2 --master-addr h -- env", "--node-rank is required"},
      {"--nnodes 2 --node-rank 2 --master-addr h -- env", "--node-rank 2"},
      {"--nnodes 2 --node-rank 1 -- env", "--master-addr"},
      {"--master-port 70000 -- env", "--master-port 70000"},
      {"--rdzv-endpoint h:port -- env", "--rdzv-endpoint 'h:port'"},
      {"--rdzv-endpoint h:1 --master-addr g -- env", "--rdzv-endpoint or --master-addr"},
      {"--rdzv-backend etcd -- env", "--rdzv-backend 'etcd'"},
      {"--standalone --nnodes 2 --node-rank 0 --master-addr h -- env", "--standalone"},
      {"--standalone --master-port 5 -- env", "--standalone"},
      {"--max-restarts -1 -- env", "--max-restarts"},
      {"--monitor-interval 0 -- env", "--monitor-interval"},
      {"--worker-binary /no/such/file -- env", "/no/such/file"},
      {"--nproc-per-node 2", "no worker command"},
      {"--nproc-per-node 2 --", "no worker command"},
      {"--bogus 1 env", "--bogus"},
      {"--nnodes 1 --bogus -- env", "--bogus"},
  };
  for (const Case& c : cases) {
    CommandResult r = Shoal("run " + c.args);
    EXPECT_EQ(r.exit_code, 2) << c.args << "\n" << r.output;
    EXPECT_TRUE(Contains(r.output, c.needle))
        << "expected '" << c.needle << "' for: " << c.args << "\n" << r.output;
    EXPECT_FALSE(Contains(r.output, "[rank")) << c.args << ": started ranks\n" << r.output;
  }
}

TEST_F(RunTest, HelpDescribesTheLauncher) {
  CommandResult r = Shoal("run --help");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  for (const char* flag : {"--nproc-per-node", "--nnodes", "--node-rank", "--rdzv-endpoint",
                           "--master-addr", "--master-port", "--max-restarts", "--standalone",
                           "--monitor-interval", "--worker-binary", "--resume"}) {
    EXPECT_TRUE(Contains(r.output, flag)) << flag << "\n" << r.output;
  }
}

}  // namespace
}  // namespace shoal
