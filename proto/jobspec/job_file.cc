#include "proto/jobspec/job_file.h"

#include <google/protobuf/util/json_util.h>
#include <yaml-cpp/yaml.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/common/status_macros.h"

namespace crossdiff::jobspec {
namespace {

nlohmann::json YamlNodeToJson(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Map: {
      nlohmann::json obj = nlohmann::json::object();
      for (const auto& kv : node) obj[kv.first.as<std::string>()] = YamlNodeToJson(kv.second);
      return obj;
    }
    case YAML::NodeType::Sequence: {
      nlohmann::json arr = nlohmann::json::array();
      for (const auto& item : node) arr.push_back(YamlNodeToJson(item));
      return arr;
    }
    case YAML::NodeType::Scalar: {
      const std::string& value = node.Scalar();
      // Plain (unquoted) scalars carry the tag "?"; quoted ones "!". Only plain ones can be
      // literals.
      if (node.Tag() == "?") {
        if (value == "true" || value == "True") return true;
        if (value == "false" || value == "False") return false;
        if (value == "null" || value == "~") return nullptr;
      }
      return value;
    }
    case YAML::NodeType::Null:
    case YAML::NodeType::Undefined:
      return nullptr;
  }
  return nullptr;
}

}  // namespace

absl::StatusOr<std::string> YamlToJson(const std::string& yaml, const std::string& source) {
  try {
    YAML::Node root = YAML::Load(yaml);
    if (!root.IsMap()) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": the job file must be a mapping of fields"));
    }
    return YamlNodeToJson(root).dump();
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(source, ":", e.mark.line + 1, ":",
                                                   e.mark.column + 1, ": invalid YAML: ", e.msg));
  }
}

absl::StatusOr<v1::JobSpec> ParseJobJson(const std::string& json, const std::string& source) {
  // Syntax first with nlohmann, whose messages carry a byte position; the proto parser then reports
  // unknown fields and mistyped values by field name.
  try {
    nlohmann::json parsed = nlohmann::json::parse(json);
    if (!parsed.is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": the job file must be a JSON object"));
    }
  } catch (const nlohmann::json::parse_error& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": invalid JSON at byte ", e.byte, ": ", e.what()));
  }
  v1::JobSpec spec;
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = false;
  auto status = google::protobuf::util::JsonStringToMessage(json, &spec, options);
  if (!status.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", std::string(status.message())));
  }
  return spec;
}

absl::StatusOr<v1::JobSpec> ReadJobFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot read the job file"));
  std::stringstream buffer;
  buffer << in.rdbuf();
  std::string text = buffer.str();
  if (absl::StripAsciiWhitespace(text).empty()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": the job file is empty"));
  }
  std::string lower = absl::AsciiStrToLower(path);
  if (absl::EndsWith(lower, ".yaml") || absl::EndsWith(lower, ".yml")) {
    ASSIGN_OR_RETURN(text, YamlToJson(text, path));
  }
  return ParseJobJson(text, path);
}

}  // namespace crossdiff::jobspec
