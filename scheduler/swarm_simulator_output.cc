#include "scheduler/swarm_simulator_output.h"

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "scheduler/simulator.h"

namespace shoal::scheduler {

std::string FormatSwarmSimulationTable(const SwarmSimulationResult& result) {
  std::string out = absl::StrFormat("%9s %7s %7s %9s  %-23s %7s %6s %6s %6s %5s  %s\n", "time",
                                    "steps", "applied", "tokens/s", "serving+syncing/stage",
                                    "replays", "fences", "joins", "deaths", "rollb", "events");
  for (const SwarmSimulationRow& r : result.rows) {
    std::vector<std::string> stages;
    for (size_t s = 0; s < r.serving.size(); ++s) {
      stages.push_back(r.syncing[s] > 0 ? absl::StrCat(r.serving[s], "+", r.syncing[s])
                                        : absl::StrCat(r.serving[s]));
    }
    absl::StrAppend(
        &out,
        absl::StrFormat("%9s %7d %7d %9s  %-23s %7d %6d %6d %6d %5d  %s\n", FormatHms(r.time_s),
                        r.steps, r.applied, FormatSi(r.tokens_per_s), absl::StrJoin(stages, " "),
                        r.replays, r.fences, r.joins, r.deaths, r.rollbacks, r.events));
  }
  const SwarmSimulationSummary& s = result.summary;
  absl::StrAppend(
      &out,
      absl::StrFormat(
          "\n%s after %s of virtual time: %d steps (%d applied), %s tokens/s on average, idle "
          "%.1f%% of the time, peers computing %.1f%% of theirs; %d replays, %d fences, %d "
          "deaths, %d joins, %d refused, %d rollbacks, %d moves, %d stale syncs, %d duplicates, "
          "%d lost\n",
          s.finished ? "finished" : "stopped", FormatHms(s.virtual_s), s.steps, s.applied,
          FormatSi(s.mean_tokens_per_s), s.virtual_s > 0 ? 100 * s.idle_s / s.virtual_s : 0.0,
          100 * s.utilisation, s.replays, s.fences, s.deaths, s.joins, s.refused, s.rollbacks,
          s.moves, s.stale_syncs, s.duplicates, s.max_lost));
  return out;
}

std::string FormatSwarmSimulationJson(const SwarmSimulationResult& result) {
  std::string out;
  for (const SwarmSimulationRow& r : result.rows) {
    nlohmann::json j;
    j["type"] = "row";
    j["time_s"] = r.time_s;
    j["steps"] = r.steps;
    j["applied"] = r.applied;
    j["tokens_per_s"] = r.tokens_per_s;
    j["serving"] = r.serving;
    j["syncing"] = r.syncing;
    j["replays"] = r.replays;
    j["fences"] = r.fences;
    j["joins"] = r.joins;
    j["deaths"] = r.deaths;
    j["rollbacks"] = r.rollbacks;
    j["events"] = r.events;
    absl::StrAppend(&out, j.dump(), "\n");
  }
  const SwarmSimulationSummary& s = result.summary;
  nlohmann::json j;
  j["type"] = "summary";
  j["virtual_s"] = s.virtual_s;
  j["steps"] = s.steps;
  j["applied"] = s.applied;
  j["tokens_per_step"] = s.tokens_per_step;
  j["mean_tokens_per_s"] = s.mean_tokens_per_s;
  j["replays"] = s.replays;
  j["fences"] = s.fences;
  j["accumulations_fenced"] = s.accumulations_fenced;
  j["duplicates"] = s.duplicates;
  j["lost"] = s.max_lost;
  j["joins"] = s.joins;
  j["refused"] = s.refused;
  j["deaths"] = s.deaths;
  j["rollbacks"] = s.rollbacks;
  j["moves"] = s.moves;
  j["stale_syncs"] = s.stale_syncs;
  j["idle_s"] = s.idle_s;
  j["utilisation"] = s.utilisation;
  j["finished"] = s.finished;
  absl::StrAppend(&out, j.dump(), "\n");
  return out;
}

}  // namespace shoal::scheduler
