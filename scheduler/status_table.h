// `shoal status`: the cluster as a fixed-width table in the style of squeue — a header line
// (health, step, loss, tokens/s, layout) and one row per worker: id, host, device, role/stage,
// tokens/s, memory per tier, seconds since the last heartbeat, state.
#ifndef SHOAL_SCHEDULER_STATUS_TABLE_H_
#define SHOAL_SCHEDULER_STATUS_TABLE_H_

#include <string>

#include "proto/coordinator.pb.h"

namespace shoal::scheduler {

std::string FormatStatusTable(const v1::ClusterStatus& status);

}  // namespace shoal::scheduler

#endif  // SHOAL_SCHEDULER_STATUS_TABLE_H_
