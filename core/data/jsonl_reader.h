// Streaming reader of JSON Lines files: one JSON value per line, blank lines ignored. Only one line
// is held in memory at a time, so files of any size can be read. Not thread-safe.
#pragma once

#include <cstdint>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace crossdiff::data {

class JsonlReader {
 public:
  // NOT_FOUND naming the path when the file cannot be opened.
  static absl::StatusOr<std::unique_ptr<JsonlReader>> Open(const std::string& path);

  // Parses the next non-blank line into `*value`. Returns false at end of file. A line that is not
  // valid JSON gives INVALID_ARGUMENT "PATH:LINE: malformed JSON (...)".
  absl::StatusOr<bool> Next(nlohmann::json* value);

  // 1-based number of the line last returned by Next (0 before the first).
  int64_t line_number() const { return line_number_; }
  const std::string& path() const { return path_; }
  // "PATH:LINE: what", the form every error about the current line takes.
  absl::Status LineError(const std::string& what) const;

 private:
  JsonlReader() = default;
  std::string path_;
  std::ifstream in_;
  std::string line_;
  int64_t line_number_ = 0;
};

}  // namespace crossdiff::data
