#include "core/data/jsonl_reader.h"

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace crossdiff::data {

absl::StatusOr<std::unique_ptr<JsonlReader>> JsonlReader::Open(const std::string& path) {
  std::unique_ptr<JsonlReader> reader(new JsonlReader());
  reader->path_ = path;
  reader->in_.open(path, std::ios::binary);
  if (!reader->in_) return absl::NotFoundError(absl::StrCat(path, ": cannot open dataset file"));
  return reader;
}

absl::Status JsonlReader::LineError(const std::string& what) const {
  return absl::InvalidArgumentError(absl::StrCat(path_, ":", line_number_, ": ", what));
}

absl::StatusOr<bool> JsonlReader::Next(nlohmann::json* value) {
  while (std::getline(in_, line_)) {
    ++line_number_;
    if (absl::StripAsciiWhitespace(line_).empty()) continue;
    try {
      *value = nlohmann::json::parse(line_);
    } catch (const nlohmann::json::parse_error& e) {
      // nlohmann's message starts with "[json.exception.parse_error.101] parse error at ...".
      std::string msg = e.what();
      if (auto pos = msg.find("] "); pos != std::string::npos) msg = msg.substr(pos + 2);
      return LineError(absl::StrCat("malformed JSON (", msg, ")"));
    }
    return true;
  }
  if (in_.bad()) return absl::DataLossError(absl::StrCat(path_, ": read error"));
  return false;
}

}  // namespace crossdiff::data
