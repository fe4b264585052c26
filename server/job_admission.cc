#include "server/job_admission.h"

#include <limits.h>
#include <stdlib.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/common/status_macros.h"
#include "proto/jobspec/job_spec_validation.h"

namespace crossdiff::server {
namespace {

absl::Status FieldError(const std::string& field, const std::string& problem) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", problem));
}

bool IsInside(const std::string& path, const std::string& root) {
  if (path == root) return true;
  std::string prefix = root.back() == '/' ? root : root + "/";
  return absl::StartsWith(path, prefix);
}

// The layer must exist in both models when their config.json says how many blocks they have.
absl::Status CheckLayer(int layer, const std::string& model_dir, const std::string& field) {
  std::ifstream in(model_dir + "/config.json");
  if (!in) return absl::OkStatus();  // the worker reports a missing config precisely
  nlohmann::json config = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (config.is_discarded() || !config.is_object()) return absl::OkStatus();
  const nlohmann::json* layers = nullptr;
  for (const char* key : {"num_hidden_layers", "n_layer", "num_layers"}) {
    if (config.contains(key) && config[key].is_number_integer()) {
      layers = &config[key];
      break;
    }
  }
  if (layers == nullptr) return absl::OkStatus();
  int64_t count = layers->get<int64_t>();
  if (layer >= count) {
    return FieldError("layer", absl::StrCat("must be between 0 and ", count - 1, " (", field,
                                            " has ", count, " blocks), got ", layer));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::string> ResolveDataPath(const std::string& field, const std::string& value,
                                            const std::string& data_root) {
  if (value.empty()) return FieldError(field, "required");
  for (absl::string_view part : absl::StrSplit(value, '/')) {
    if (part == "..") return FieldError(field, absl::StrCat("'", value, "' must not contain '..'"));
  }
  std::string joined = value[0] == '/' ? value : data_root + "/" + value;
  if (!IsInside(joined, data_root)) {
    return FieldError(field, absl::StrCat("'", value, "' is outside the data root"));
  }
  char real[PATH_MAX];
  if (realpath(joined.c_str(), real) == nullptr) {
    return FieldError(field, absl::StrCat("'", value, "' does not exist under the data root"));
  }
  if (!IsInside(real, data_root)) {
    return FieldError(field,
                      absl::StrCat("'", value, "' resolves outside the data root (symlink)"));
  }
  return std::string(real);
}

absl::StatusOr<AdmittedJob> AdmitJob(const v1::JobSpec& submitted, const std::string& data_root,
                                     const JobLimits& limits) {
  AdmittedJob job;
  job.spec = submitted;
  jobspec::ApplyDefaults(job.spec);
  RETURN_IF_ERROR(jobspec::ValidateJobSpec(job.spec));
  const auto& spec = job.spec;
  if (spec.harvest().max_tokens() > limits.max_tokens) {
    return FieldError("harvest.max_tokens",
                      absl::StrCat("exceeds this coordinator's limit of ", limits.max_tokens));
  }
  if (spec.crosscoder().dict_size() > limits.max_dict_size) {
    return FieldError("crosscoder.dict_size",
                      absl::StrCat("exceeds this coordinator's limit of ", limits.max_dict_size));
  }
  if (spec.crosscoder().steps() > limits.max_steps) {
    return FieldError("crosscoder.steps",
                      absl::StrCat("exceeds this coordinator's limit of ", limits.max_steps));
  }
  if (spec.workers() > limits.max_workers) {
    return FieldError("workers",
                      absl::StrCat("exceeds this coordinator's limit of ", limits.max_workers));
  }
  ASSIGN_OR_RETURN(*job.inputs.mutable_base_model(),
                   ResolveDataPath("base_model", spec.base_model(), data_root));
  ASSIGN_OR_RETURN(*job.inputs.mutable_finetune_model(),
                   ResolveDataPath("finetune_model", spec.finetune_model(), data_root));
  ASSIGN_OR_RETURN(*job.inputs.mutable_dataset(),
                   ResolveDataPath("dataset.path", spec.dataset().path(), data_root));
  if (!spec.analysis().probes_path().empty()) {
    ASSIGN_OR_RETURN(
        *job.inputs.mutable_probes(),
        ResolveDataPath("analysis.probes_path", spec.analysis().probes_path(), data_root));
  }
  RETURN_IF_ERROR(CheckLayer(spec.layer(), job.inputs.base_model(), "base_model"));
  RETURN_IF_ERROR(CheckLayer(spec.layer(), job.inputs.finetune_model(), "finetune_model"));
  return job;
}

}  // namespace crossdiff::server
