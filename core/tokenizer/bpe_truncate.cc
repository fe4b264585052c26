#include "core/tokenizer/bpe_truncate.h"

#include <filesystem>
#include <fstream>
#include <set>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "core/common/status_macros.h"
#include "core/tokenizer/byte_level.h"
#include "core/tokenizer/tokenizer_config.h"
#include "nlohmann/json.hpp"

namespace crossdiff::tokenizer {
namespace {

// ordered_json keeps the source's key order, so the copy reads like the original.
using Json = nlohmann::ordered_json;

absl::StatusOr<Json> ParseFile(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  Json j = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object())
    return absl::InvalidArgumentError(absl::StrCat(path, ": malformed JSON"));
  return j;
}

absl::Status WriteFile(const std::string& path, const Json& j) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return absl::InternalError(absl::StrCat(tmp, ": cannot open for writing"));
    out << j.dump(2, ' ', /*ensure_ascii=*/false);
    if (!out) return absl::InternalError(absl::StrCat(tmp, ": write error"));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec)
    return absl::InternalError(absl::StrCat(path, ": cannot rename into place: ", ec.message()));
  return absl::OkStatus();
}

// True when some integer id >= limit appears in a post-processor description.
bool RefersToIdAtLeast(const Json& j, int64_t limit, bool in_ids) {
  if (j.is_number_integer()) return in_ids && j.get<int64_t>() >= limit;
  if (j.is_array()) {
    for (const Json& e : j) {
      if (RefersToIdAtLeast(e, limit, in_ids)) return true;
    }
  }
  if (j.is_object()) {
    for (const auto& [key, value] : j.items()) {
      if (RefersToIdAtLeast(value, limit, in_ids || key == "ids" || key == "sep" || key == "cls"))
        return true;
    }
  }
  return false;
}

}  // namespace

absl::Status WriteTruncatedBpeTokenizer(const std::string& src_tokenizer_json, int64_t vocab_size,
                                        const std::string& dst_dir) {
  namespace fs = std::filesystem;
  const std::string& src = src_tokenizer_json;
  if (vocab_size < 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("vocab_size ", vocab_size, " < 256: the byte tokens must be kept"));
  }
  ASSIGN_OR_RETURN(Json root, ParseFile(src));
  if (!root.contains("model") || !root["model"].is_object() ||
      root["model"].value("type", "") != "BPE" || !root["model"].contains("vocab") ||
      !root["model"]["vocab"].is_object() || !root["model"].contains("merges") ||
      !root["model"]["merges"].is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat(src, ": field 'model' is not a BPE model with vocab and merges"));
  }
  Json& model = root["model"];
  Json kept_vocab = Json::object();
  std::set<std::string> kept;
  for (const auto& [token, id] : model["vocab"].items()) {
    if (!id.is_number_integer())
      return absl::InvalidArgumentError(
          absl::StrCat(src, ": field 'model.vocab' has a non-integer id"));
    if (id.get<int64_t>() < vocab_size) {
      kept_vocab[token] = id;
      kept.insert(token);
    }
  }
  for (int b = 0; b < 256; ++b) {
    if (!kept.count(byte_level::ByteToToken(static_cast<uint8_t>(b)))) {
      return absl::InvalidArgumentError(
          absl::StrCat(src, ": not a byte-level BPE: the token of byte ", b,
                       " is missing or has an id >= ", vocab_size));
    }
  }
  Json kept_merges = Json::array();
  for (size_t rank = 0; rank < model["merges"].size(); ++rank) {
    const Json& m = model["merges"][rank];
    std::string left, right;
    if (m.is_string()) {
      const std::string s = m.get<std::string>();
      const size_t space = s.find(' ');
      if (space == std::string::npos)
        return absl::InvalidArgumentError(
            absl::StrCat(src, ": field 'model.merges[", rank, "]' is malformed"));
      left = s.substr(0, space);
      right = s.substr(space + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      left = m[0].get<std::string>();
      right = m[1].get<std::string>();
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(src, ": field 'model.merges[", rank, "]' is malformed"));
    }
    if (!kept.count(left + right)) continue;  // its result was dropped
    if (!kept.count(left) || !kept.count(right)) {
      return absl::InvalidArgumentError(
          absl::StrCat(src, ": merge ", rank, " ('", left, "' + '", right,
                       "') keeps its result but refers to a dropped token"));
    }
    kept_merges.push_back(m);
  }
  model["vocab"] = std::move(kept_vocab);
  model["merges"] = std::move(kept_merges);

  std::set<std::string> kept_added;
  if (root.contains("added_tokens") && root["added_tokens"].is_array()) {
    Json added = Json::array();
    for (const Json& a : root["added_tokens"]) {
      if (a.is_object() && a.contains("id") && a["id"].is_number_integer() &&
          a["id"].get<int64_t>() < vocab_size) {
        added.push_back(a);
        if (a.contains("content") && a["content"].is_string())
          kept_added.insert(a["content"].get<std::string>());
      }
    }
    root["added_tokens"] = std::move(added);
  }
  if (root.contains("post_processor") &&
      RefersToIdAtLeast(root["post_processor"], vocab_size, false)) {
    root["post_processor"] = nullptr;  // its BOS/EOS tokens were dropped
  }

  std::error_code ec;
  fs::create_directories(dst_dir, ec);
  if (ec)
    return absl::InternalError(absl::StrCat(dst_dir, ": cannot create directory: ", ec.message()));
  RETURN_IF_ERROR(WriteFile((fs::path(dst_dir) / "tokenizer.json").string(), root));

  // tokenizer_config.json: drop what names a removed token.
  const std::string config_src = (fs::path(src).parent_path() / "tokenizer_config.json").string();
  if (fs::exists(config_src, ec)) {
    ASSIGN_OR_RETURN(Json config, ParseFile(config_src));
    auto is_kept = [&](const std::string& t) {
      return kept.count(t) > 0 || kept_added.count(t) > 0;
    };
    if (config.contains("added_tokens_decoder") && config["added_tokens_decoder"].is_object()) {
      Json decoder = Json::object();
      for (const auto& [key, value] : config["added_tokens_decoder"].items()) {
        int64_t id;
        if (absl::SimpleAtoi(key, &id) && id < vocab_size) decoder[key] = value;
      }
      config["added_tokens_decoder"] = std::move(decoder);
    }
    for (const char* field : {"bos_token", "eos_token", "unk_token", "pad_token"}) {
      if (!config.contains(field)) continue;
      const Json& v = config[field];
      const std::string content =
          v.is_string() ? v.get<std::string>()
          : v.is_object() && v.contains("content") && v["content"].is_string()
              ? v["content"].get<std::string>()
              : std::string();
      if (!content.empty() && !is_kept(content)) config[field] = nullptr;
    }
    if (config.contains("bos_token") && config["bos_token"].is_null())
      config["add_bos_token"] = false;
    if (config.contains("eos_token") && config["eos_token"].is_null() &&
        config.contains("add_eos_token")) {
      config["add_eos_token"] = false;
    }
    if (config.contains("additional_special_tokens") &&
        config["additional_special_tokens"].is_array()) {
      Json extra = Json::array();
      for (const Json& t : config["additional_special_tokens"]) {
        if (t.is_string() && is_kept(t.get<std::string>())) extra.push_back(t);
      }
      config["additional_special_tokens"] = std::move(extra);
    }
    RETURN_IF_ERROR(WriteFile((fs::path(dst_dir) / "tokenizer_config.json").string(), config));
  }
  return absl::OkStatus();
}

}  // namespace crossdiff::tokenizer
