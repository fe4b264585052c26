// Defaults and field checks of a JobSpec, shared by the CLI (checks a job file before sending it)
// and the coordinator (checks again, then resolves paths against its data root and applies its
// limits).
//
// Only what can be checked without the filesystem lives here. Stateless; thread-safe.
#pragma once

#include "absl/status/status.h"
#include "crossdiff/v1/job.pb.h"

namespace crossdiff::jobspec {

// Fills unset (zero/empty) optional fields with the defaults documented in job.proto.
void ApplyDefaults(v1::JobSpec& spec);

// Checks every field of a spec with defaults applied. The first problem is returned as
// INVALID_ARGUMENT "field.path: problem", e.g. "crosscoder.k: must be between 1 and dict_size
// (256), got 0".
absl::Status ValidateJobSpec(const v1::JobSpec& spec);

}  // namespace crossdiff::jobspec
