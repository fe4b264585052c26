// Job files: the proto JSON form of crossdiff.v1.JobSpec (DESIGN.md 3.6), or YAML with the same
// fields.
//
// Parsing is strict: unknown fields and mistyped values are errors naming the file and the field,
// so a typo never silently turns into a default. Stateless; thread-safe.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "crossdiff/v1/job.pb.h"

namespace crossdiff::jobspec {

// Reads PATH and parses it: YAML when the name ends in .yaml/.yml, JSON otherwise.
// INVALID_ARGUMENT "PATH: ..." on a parse error; NOT_FOUND when the file cannot be read.
absl::StatusOr<v1::JobSpec> ReadJobFile(const std::string& path);

// Parses proto JSON text. `source` names the input in errors (a file name).
absl::StatusOr<v1::JobSpec> ParseJobJson(const std::string& json, const std::string& source);

// Converts YAML text to JSON text: mappings -> objects, sequences -> arrays, `true`/`false`/`null`
// plain scalars -> JSON literals, every other scalar -> a JSON string (proto JSON accepts numbers
// as strings, so numeric fields still parse). INVALID_ARGUMENT "source:line:col: ..." on bad YAML.
absl::StatusOr<std::string> YamlToJson(const std::string& yaml, const std::string& source);

}  // namespace crossdiff::jobspec
