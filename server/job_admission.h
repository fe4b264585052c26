// What the coordinator checks before it accepts a job: the spec's fields (proto/jobspec), the
// coordinator's limits, and the paths, which must exist inside the data root.
//
// Path rules: relative paths resolve against the data root; absolute ones must lie inside it; a
// path with a `..` component is rejected outright, and the real path (symlinks resolved) must still
// lie inside the data root. Every error is INVALID_ARGUMENT naming the field ("base_model: ...").
// Stateless; thread-safe.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "crossdiff/v1/job.pb.h"
#include "crossdiff/v1/worker_service.pb.h"

namespace crossdiff::server {

struct JobLimits {
  int64_t max_tokens = 10'000'000'000;
  int64_t max_dict_size = 1 << 20;
  int32_t max_workers = 64;
  int64_t max_steps = 100'000'000;
};

struct AdmittedJob {
  v1::JobSpec spec;  // defaults applied
  v1::ResolvedInputs inputs;
};

absl::StatusOr<AdmittedJob> AdmitJob(const v1::JobSpec& submitted, const std::string& data_root,
                                     const JobLimits& limits);

// Resolves one path field against `data_root` (an absolute real path) with the rules above.
absl::StatusOr<std::string> ResolveDataPath(const std::string& field, const std::string& value,
                                            const std::string& data_root);

}  // namespace crossdiff::server
