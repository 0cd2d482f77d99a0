// What `shoal simulate --swarm` prints of a swarm simulation (swarm_simulator.h): a table for
// people or JSON lines for scripts. Pure functions of the result; thread-safe.
#ifndef SHOAL_SCHEDULER_SWARM_SIMULATOR_OUTPUT_H_
#define SHOAL_SCHEDULER_SWARM_SIMULATOR_OUTPUT_H_

#include <string>

#include "scheduler/swarm_simulator.h"

namespace shoal::scheduler {

// A header, one line per row (peers per stage as "serving+syncing", the syncing part left out
// when 0), then the summary.
std::string FormatSwarmSimulationTable(const SwarmSimulationResult& result);
// One {"type":"row",...} object per row, then {"type":"summary",...}, each on its own line.
std::string FormatSwarmSimulationJson(const SwarmSimulationResult& result);

}  // namespace shoal::scheduler

#endif  // SHOAL_SCHEDULER_SWARM_SIMULATOR_OUTPUT_H_
