// Writes the three report files, each atomically (temporary file + rename) so a reader never sees a
// half-written report.
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/analysis/report.h"
#include "core/common/status_macros.h"

namespace crossdiff::analysis {
namespace {

absl::Status WriteAtomically(const std::string& path, const std::string& text) {
  const std::string tmp = absl::StrCat(path, ".tmp-", getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return absl::PermissionDeniedError(absl::StrCat(path, ": cannot open for writing"));
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    out.flush();
    if (!out) return absl::DataLossError(absl::StrCat(path, ": write failed"));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return absl::PermissionDeniedError(absl::StrCat(path, ": cannot rename the temporary file"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status WriteReportFiles(const Report& report, const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec)
    return absl::PermissionDeniedError(
        absl::StrCat(dir, ": cannot create directory: ", ec.message()));
  RETURN_IF_ERROR(WriteAtomically(dir + "/report.json", ReportToJson(report)));
  RETURN_IF_ERROR(WriteAtomically(dir + "/report.md", RenderMarkdown(report)));
  RETURN_IF_ERROR(WriteAtomically(dir + "/report.html", RenderHtml(report)));
  return absl::OkStatus();
}

}  // namespace crossdiff::analysis
