#include "core/analysis/probe_categories.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <nlohmann/ordered_map.hpp>
#include <sstream>

#include "absl/strings/str_cat.h"

namespace crossdiff::analysis {
namespace {

using Json = nlohmann::ordered_json;

absl::Status Bad(const std::string& source, const std::string& category, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(source, ": category '", category, "': ", what));
}

// Appends the elements of a list of ints or strings to the category.
absl::Status ReadList(const Json& list, const std::string& source, ProbeCategory& c,
                      const char* only /* nullptr: either kind */) {
  if (!list.is_array() || list.empty()) {
    return Bad(source, c.name, "expected a non-empty list of sequence ids or substrings");
  }
  for (const Json& v : list) {
    if (v.is_number_integer() && (only == nullptr || std::string(only) == "sequence_ids")) {
      c.sequence_ids.push_back(v.get<int64_t>());
    } else if (v.is_string() && (only == nullptr || std::string(only) == "substrings")) {
      if (v.get<std::string>().empty()) return Bad(source, c.name, "empty substring");
      c.substrings.push_back(v.get<std::string>());
    } else {
      return Bad(source, c.name,
                 absl::StrCat("unexpected element ", v.dump(),
                              only ? absl::StrCat(" in \"", only, "\"") : std::string()));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<ProbeCategory>> ParseProbeCategories(const std::string& json_text,
                                                                const std::string& source) {
  Json root = Json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded())
    return absl::InvalidArgumentError(absl::StrCat(source, ": not valid JSON"));
  if (!root.is_object() || root.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": expected a JSON object mapping category names to probes"));
  }
  std::vector<ProbeCategory> out;
  for (auto it = root.begin(); it != root.end(); ++it) {
    ProbeCategory c;
    c.name = it.key();
    const Json& v = it.value();
    if (v.is_array()) {
      if (absl::Status s = ReadList(v, source, c, nullptr); !s.ok()) return s;
    } else if (v.is_object()) {
      for (auto f = v.begin(); f != v.end(); ++f) {
        if (f.key() != "sequence_ids" && f.key() != "substrings") {
          return Bad(
              source, c.name,
              absl::StrCat("unknown field '", f.key(), "' (expected sequence_ids or substrings)"));
        }
        if (absl::Status s = ReadList(f.value(), source, c, f.key().c_str()); !s.ok()) return s;
      }
      if (c.sequence_ids.empty() && c.substrings.empty()) {
        return Bad(source, c.name, "needs sequence_ids or substrings");
      }
    } else {
      return Bad(source, c.name, "expected a list or an object");
    }
    out.push_back(std::move(c));
  }
  return out;
}

absl::StatusOr<std::vector<ProbeCategory>> LoadProbeCategories(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot read the categories file"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ParseProbeCategories(ss.str(), path);
}

}  // namespace crossdiff::analysis
