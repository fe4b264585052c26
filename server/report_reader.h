// Reads a job's report.json (DESIGN.md 3.5) into API messages: plain JSON, no LibTorch. Parsed
// reports are cached by path (a finished job's report never changes); thread-safe.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "crossdiff/v1/diff_service.pb.h"

namespace crossdiff::server {

struct ParsedReport {
  std::vector<v1::LatentStats> latents;  // as stored (by index)
  v1::ReportSummary summary;
  std::vector<v1::Capability> capabilities;
};

// Parses report.json text. INVALID_ARGUMENT "SOURCE: field: problem" for a malformed report.
absl::StatusOr<ParsedReport> ParseReportJson(const std::string& text, const std::string& source);

class ReportCache {
 public:
  explicit ReportCache(size_t capacity = 16) : capacity_(capacity) {}
  // DIR/report.json, parsed. NOT_FOUND when the file is missing.
  absl::StatusOr<std::shared_ptr<const ParsedReport>> Get(const std::string& report_dir);

 private:
  size_t capacity_;
  std::mutex mu_;
  std::map<std::string, std::shared_ptr<const ParsedReport>> cache_;
  std::vector<std::string> order_;  // insertion order, for eviction
};

// The latents of `report` matching `tag` (all when empty), sorted by delta in `order` (ties by
// index). INVALID_ARGUMENT for an unknown tag.
absl::StatusOr<std::vector<const v1::LatentStats*>> SelectLatents(const ParsedReport& report,
                                                                  const std::string& tag,
                                                                  v1::LatentOrder order);

// Reads a whole file. NOT_FOUND when it cannot be opened.
absl::StatusOr<std::string> ReadTextFile(const std::string& path);

}  // namespace crossdiff::server
