// The simulator: the coordinator's membership and layout solver run on virtual devices and a
// virtual clock. Virtual workers Join a real CoordinatorCore (on a ManualClock) with their
// profiles and the job spec, heartbeat on its interval, fail (stop heartbeating) at a churn rate
// and are replaced after a delay; the core's lease expiry notices each failure and re-solves,
// exactly as the live coordinator does. Training advances by the current layout's predicted step
// time, stalls while a placed device is dead, and pays a restart after each layout change. The
// model of time is written down in docs/cost-model.md ("The simulator").
//
// Everything is a pure function of the devices file, the options and the seed: two runs with the
// same inputs give the same rows.
//
// Also home of SyntheticCluster(), the deterministic heterogeneous device mix that
// `shoal bench coordinator` and the solver's tests use.
//
// Not thread-safe: one simulation runs on the calling thread.
#ifndef SHOAL_SCHEDULER_SIMULATOR_H_
#define SHOAL_SCHEDULER_SIMULATOR_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "proto/coordinator.pb.h"
#include "scheduler/layout_solver.h"

namespace shoal::scheduler {

// `n` devices with ids "dev-00000" ...: hosts of 8 H100-like or 8 A100-like GPUs, of 4 V100-like
// GPUs, and CPU-only hosts with one worker each (about 25/35/20/20 % of the hosts), with realistic
// measured rates, memory per tier and network bandwidth, a few percent apart within a model. The
// last host may be cut short. The same (n, seed) always gives the same list; n <= 0 an empty one.
std::vector<SolverDevice> SyntheticCluster(int n, uint64_t seed);

// One [[group]] of a devices file: `count` identical devices, `devices_per_host` to a host.
struct DeviceGroupSpec {
  std::string name;
  int count = 0;
  int devices_per_host = 1;
  bool preemptible = false;
  v1::DeviceProfile profile;  // everything but the host, which the simulator names
  // Stragglers (`shoal simulate --swarm` only): from slow_after_s of virtual time on (>= 0; -1:
  // never) the group's devices compute slow_factor (>= 1) times slower than their profile.
  double slow_after_s = -1;
  double slow_factor = 1;
};

// The optional [simulation] table.
struct SimulationSettings {
  double lease_s = 10;           // the coordinator's lease
  double heartbeat_s = 2;        // the heartbeat interval
  double replace_after_s = 120;  // a failed device's replacement joins this long after
  double restart_s = 30;         // training time lost when the placement changes
  // `shoal simulate --swarm` only: a stage round's fixed cost beside its bytes (the plan, the
  // group's connections, the report, the next step's lease), in [0, 3600]; 0: none.
  double round_s = 0;
  double relayout_gain = 0;      // the coordinator's relayout_min_gain (coordinator_core.h)
  double report_every_s = 600;   // a table row at least this often
  double max_hours = 168;        // stop here even if the steps are not done
};

struct ClusterSpec {
  std::string source;  // the file name, for messages
  v1::JobSpec job;
  std::vector<DeviceGroupSpec> groups;
  SimulationSettings settings;
};

// Parses a devices file (format in docs/cost-model.md and configs/clusters/). Every value is
// checked: kInvalidArgument naming the key and the file ("group[1].fp32_gflops must be > 0, got
// -5 in swarm.toml (line 12)"); kNotFound when the file does not exist.
absl::StatusOr<ClusterSpec> ParseClusterToml(const std::string& text, const std::string& source);
absl::StatusOr<ClusterSpec> LoadClusterFile(const std::string& path);

// The devices of the file as the simulator joins them at time 0: ids "<group>-<k>", hosts
// "<group>-h<k / devices_per_host>".
std::vector<SolverDevice> ClusterDevices(const ClusterSpec& spec);

struct SimulationOptions {
  // Expected failures per preemptible device per virtual hour (exponential lifetimes); 0: none.
  double churn_per_hour = 0;
  int64_t steps = 1000;  // stop after this many optimizer steps (or settings.max_hours)
  uint64_t seed = 1;
  SolverOptions solver;
};

// One line of the throughput table: the state right after everything that happened at time_s.
struct SimulationRow {
  double time_s = 0;
  int alive = 0;                // devices heartbeating
  uint64_t layout_version = 0;  // 0: no layout yet
  int layout_devices = 0;       // devices the layout was solved for (placed + unused)
  int placed = 0;
  int tp = 0, pp = 0, dp = 0;
  double predicted_tokens_per_s = 0;  // the layout's prediction
  double tokens_per_s = 0;            // rate from this row to the next (0: stalled or restarting)
  double tokens = 0;                  // cumulative at time_s
  double steps = 0;                   // cumulative optimizer steps (tokens / tokens per step)
  std::string events;                 // what happened at time_s, "; "-separated
};

struct SimulationSummary {
  double virtual_s = 0;
  double tokens = 0;
  double steps = 0;
  double mean_tokens_per_s = 0;  // tokens / virtual_s
  double best_predicted_tokens_per_s = 0;
  double idle_s = 0;  // stalled or restarting
  int failures = 0;
  int joins = 0;             // every Join, the initial devices included
  int layouts = 0;           // layout versions seen
  bool finished = false;     // the steps were reached before max_hours
  std::string final_layout;  // the last layout's summary
};

struct SimulationResult {
  std::vector<SimulationRow> rows;
  SimulationSummary summary;
};

// kResourceExhausted (with the solver's reason) when the initial devices cannot hold the model;
// kInvalidArgument for bad options (negative churn, steps < 1).
absl::StatusOr<SimulationResult> Simulate(const ClusterSpec& spec,
                                          const SimulationOptions& options);

// A fixed-world job under kills, as `shoal run --max-restarts` runs it: every kill stops the
// whole job, which starts again (start_s: launch, rendezvous, loading) from its newest checkpoint,
// losing the steps since. The kills come every kill_every_s from launch; a kill during a start
// begins it again. The job starts at time 0 like the first launch. Steps take step_s each,
// checkpoints (every checkpoint_every steps) cost nothing.
struct StaticRestartOptions {
  double seconds = 0;            // the run's length, > 0
  double step_s = 0;             // > 0
  double start_s = 0;            // >= 0
  int64_t checkpoint_every = 0;  // >= 1
  double kill_every_s = 0;       // > 0; infinity: no kills
};
struct StaticRestartResult {
  int64_t steps = 0;       // the furthest step reached (as a log's "step N" counts it)
  int64_t kills = 0;       // kills within the run
  int64_t steps_lost = 0;  // steps run again after kills
};
// kInvalidArgument naming the option out of range.
absl::StatusOr<StaticRestartResult> SimulateStaticRestarts(const StaticRestartOptions& options);

// The human table (a header, one line per row, then the summary) and the JSON lines
// ({"type":"row",...} per row, then {"type":"summary",...}).
std::string FormatSimulationTable(const SimulationResult& result);
std::string FormatSimulationJson(const SimulationResult& result);

// The tables' units, shared with the swarm simulator's (swarm_simulator.h): "1:02:03" for
// 3723.4 s (whole seconds, rounded down), and 3 significant digits with k, M, G or T.
std::string FormatHms(double seconds);
std::string FormatSi(double value);

}  // namespace shoal::scheduler

#endif  // SHOAL_SCHEDULER_SIMULATOR_H_
