#include "core/tokenizer/tokenizer_config.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "core/common/status_macros.h"
#include "nlohmann/json.hpp"

namespace crossdiff::tokenizer {
namespace {

using nlohmann::json;

// A token given as "<s>", {"content": "<s>", ...} or null.
absl::StatusOr<std::string> TokenString(const json& j, const std::string& file,
                                        const std::string& field) {
  if (j.is_null()) return std::string();
  if (j.is_string()) return j.get<std::string>();
  if (j.is_object() && j.contains("content") && j["content"].is_string())
    return j["content"].get<std::string>();
  return absl::InvalidArgumentError(
      absl::StrCat(file, ": field '", field, "' is not a token string"));
}

absl::Status ReadTokenFields(const json& j, const std::string& file, bool only_missing,
                             TokenizerConfig* config) {
  struct Field {
    const char* name;
    std::string* value;
  };
  for (const Field& f :
       {Field{"bos_token", &config->bos_token}, Field{"eos_token", &config->eos_token},
        Field{"pad_token", &config->pad_token}, Field{"unk_token", &config->unk_token}}) {
    if (!j.contains(f.name) || (only_missing && !f.value->empty())) continue;
    ASSIGN_OR_RETURN(*f.value, TokenString(j[f.name], file, f.name));
  }
  return absl::OkStatus();
}

absl::StatusOr<json> ParseJsonFile(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, ": malformed JSON"));
  if (!j.is_object())
    return absl::InvalidArgumentError(absl::StrCat(path, ": top level is not a JSON object"));
  return j;
}

}  // namespace

absl::StatusOr<std::string> ReadFileToString(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) {
    return absl::NotFoundError(absl::StrCat(path, ": no such file"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InternalError(absl::StrCat(path, ": cannot open for reading"));
  std::ostringstream buffer;
  buffer << in.rdbuf();
  if (in.bad()) return absl::InternalError(absl::StrCat(path, ": read error"));
  return buffer.str();
}

absl::StatusOr<TokenizerConfig> ReadTokenizerConfig(const std::string& model_dir) {
  TokenizerConfig config;
  const std::string path = (std::filesystem::path(model_dir) / "tokenizer_config.json").string();
  std::error_code ec;
  if (std::filesystem::exists(path, ec)) {
    ASSIGN_OR_RETURN(json j, ParseJsonFile(path));
    config.present = true;
    for (const char* flag : {"add_bos_token", "add_eos_token"}) {
      if (!j.contains(flag) || j[flag].is_null()) continue;
      if (!j[flag].is_boolean()) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": field '", flag, "' is not a boolean"));
      }
      (std::string(flag) == "add_bos_token" ? config.add_bos_token : config.add_eos_token) =
          j[flag].get<bool>();
    }
    RETURN_IF_ERROR(ReadTokenFields(j, path, /*only_missing=*/false, &config));
    if (j.contains("chat_template") && !j["chat_template"].is_null()) {
      const json& t = j["chat_template"];
      if (t.is_string()) {
        config.chat_template = t.get<std::string>();
      } else if (t.is_array()) {
        // [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        for (const json& entry : t) {
          if (!entry.is_object() || !entry.contains("template") || !entry["template"].is_string()) {
            return absl::InvalidArgumentError(absl::StrCat(
                path, ": field 'chat_template' has an entry without a 'template' string"));
          }
          const bool is_default = entry.contains("name") && entry["name"] == "default";
          if (config.chat_template.empty() || is_default)
            config.chat_template = entry["template"].get<std::string>();
          if (is_default) break;
        }
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": field 'chat_template' is not a string or a list"));
      }
    }
  }
  const std::string map_path =
      (std::filesystem::path(model_dir) / "special_tokens_map.json").string();
  if (std::filesystem::exists(map_path, ec)) {
    ASSIGN_OR_RETURN(json j, ParseJsonFile(map_path));
    RETURN_IF_ERROR(ReadTokenFields(j, map_path, /*only_missing=*/true, &config));
  }
  return config;
}

}  // namespace crossdiff::tokenizer
