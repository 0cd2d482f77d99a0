// A small job spec (a 4-head, 128-wide GPT, fp32 AdamW state sizes) shared by the coordinator's
// tests.
#ifndef SHOAL_TESTS_SCHEDULER_TEST_JOB_H_
#define SHOAL_TESTS_SCHEDULER_TEST_JOB_H_

#include <string>

#include "proto/coordinator.pb.h"

namespace shoal::testing {

inline v1::JobSpec SmallJob(const std::string& name, int expected_workers, int n_layer = 4) {
  v1::JobSpec job;
  job.set_name(name);
  v1::ModelSpec* m = job.mutable_model();
  m->set_n_layer(n_layer);
  m->set_n_head(4);
  m->set_n_embd(128);
  m->set_block_size(64);
  m->set_vocab_size(256);
  m->set_param_bytes(4);
  m->set_grad_bytes(4);
  m->set_optimizer_bytes(8);
  job.set_global_batch(16);
  job.set_expected_workers(expected_workers);
  return job;
}

}  // namespace shoal::testing

#endif  // SHOAL_TESTS_SCHEDULER_TEST_JOB_H_
