// Helpers for tests that run real `shoal train` processes as the ranks of a job and compare what
// they wrote (metrics.jsonl, checkpoints) with a reference run.
#ifndef SHOAL_TESTS_PARALLEL_TRAIN_RUNS_H_
#define SHOAL_TESTS_PARALLEL_TRAIN_RUNS_H_

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "runtime/prepare_data.h"
#include "runtime/safetensors.h"
#include "tests/json_util.h"
#include "tests/test_util.h"

namespace shoal::testing {

// Writes `chars` characters of synthetic text under `dir` and prepares it into `dir`/data.
inline void PrepareCorpus(const std::string& dir, size_t chars) {
  WriteTextFile(dir + "/corpus.txt", SyntheticText(chars));
  runtime::PrepareDataOptions o;
  o.inputs = {dir + "/corpus.txt"};
  o.out_dir = dir + "/data";
  o.progress = false;
  absl::Status s = runtime::PrepareData(o);
  ASSERT_TRUE(s.ok()) << s;
}

// Starts `n` ranks of `command(rank)` as the launchers do (environment variables, one master port),
// waits for all. Each result has the job's exit code (non-zero if any rank failed) and that
// rank's output.
inline std::vector<CommandResult> RunRanks(int n, const std::function<std::string(int)>& command) {
  const int port = FreePort();
  TempDir logdir;
  std::string script = "pids=''; ";
  for (int r = 0; r < n; ++r) {
    script += "RANK=" + std::to_string(r) + " LOCAL_RANK=" + std::to_string(r) +
              " WORLD_SIZE=" + std::to_string(n) + " LOCAL_WORLD_SIZE=" + std::to_string(n) +
              " MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(port) + " " + command(r) +
              " > " + (logdir / std::to_string(r)) + " 2>&1 & pids=\"$pids $!\"; ";
  }
  script += "rc=0; for p in $pids; do wait $p || rc=$?; done; exit $rc";
  CommandResult all = RunCommand("bash -c '" + script + "'");
  std::vector<CommandResult> out(n);
  for (int r = 0; r < n; ++r) {
    out[r].exit_code = all.exit_code;
    out[r].output = ReadTextFile(logdir / std::to_string(r));
  }
  return out;
}

// The same command on every rank.
inline std::vector<CommandResult> RunRanks(int n, const std::string& command) {
  return RunRanks(n, [&](int) { return command; });
}


// Every tensor of the reference safetensors file is in `got_path` with a relative error (in the
// Frobenius norm) below `tolerance`. Relative in the norm: summation order differs between
// layouts, and Adam amplifies that noise in elements whose gradient is near zero, so an
// element-wise bound would measure Adam, not the parallelism.
inline void ExpectWeightsClose(const std::string& ref_path, const std::string& got_path,
                               double tolerance) {
  auto a = runtime::ReadSafetensors(ref_path);
  auto b = runtime::ReadSafetensors(got_path);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(a->tensors.size(), b->tensors.size());
  for (auto& [name, t] : a->tensors) {
    ASSERT_TRUE(b->tensors.count(name)) << name;
    at::Tensor want = t, got = b->tensors.at(name);
    ASSERT_EQ(want.sizes(), got.sizes()) << name;
    if (name.find("attn.qkv.bias") != std::string::npos) {
      // The key bias has an exactly zero true gradient, so both runs only see rounding noise
      // there, which Adam scales to full-size steps: compare the query and value parts.
      const int64_t c = want.numel() / 3;
      want = at::cat({want.narrow(0, 0, c), want.narrow(0, 2 * c, c)});
      got = at::cat({got.narrow(0, 0, c), got.narrow(0, 2 * c, c)});
    }
    const double err = (got - want).norm().item<double>() / want.norm().item<double>();
    EXPECT_LT(err, tolerance) << name;
  }
}

}  // namespace shoal::testing

#endif  // SHOAL_TESTS_PARALLEL_TRAIN_RUNS_H_
