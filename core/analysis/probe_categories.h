// Probe categories for capability attribution (DESIGN.md section 4), read from the JSON file given
// to `crossdiff analyze --categories FILE` (format in docs/report.md).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace crossdiff::analysis {

struct ProbeCategory {
  std::string name;
  std::vector<int64_t> sequence_ids;    // sequences that belong to the category
  std::vector<std::string> substrings;  // a sequence whose decoded text contains one belongs too
};

// Parses the categories JSON text. Each key is a category; its value is a list of sequence ids
// (integers), a list of substrings (strings), or an object with "sequence_ids" and/or "substrings".
// INVALID_ARGUMENT naming `source` and the category on anything else (including an empty list).
// Categories keep the file's order.
absl::StatusOr<std::vector<ProbeCategory>> ParseProbeCategories(const std::string& json_text,
                                                                const std::string& source);
// Reads and parses FILE; NOT_FOUND when it cannot be read.
absl::StatusOr<std::vector<ProbeCategory>> LoadProbeCategories(const std::string& path);

}  // namespace crossdiff::analysis
