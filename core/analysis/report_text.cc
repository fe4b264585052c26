#include "core/analysis/report_text.h"

#include <algorithm>

#include "absl/strings/str_format.h"

namespace crossdiff::analysis {

std::string DeltaHistogramText(const std::array<int64_t, kDeltaHistogramBins>& bins, int width) {
  int64_t largest = 0;
  for (int64_t c : bins) largest = std::max(largest, c);
  std::string out;
  for (int i = 0; i < kDeltaHistogramBins; ++i) {
    const double lo = static_cast<double>(i) / kDeltaHistogramBins;
    const double hi = static_cast<double>(i + 1) / kDeltaHistogramBins;
    int bar = largest > 0 ? static_cast<int>((bins[i] * width + largest - 1) / largest) : 0;
    absl::StrAppendFormat(&out, "[%.2f, %.2f%c %7d %s\n", lo, hi,
                          i + 1 == kDeltaHistogramBins ? ']' : ')', bins[i], std::string(bar, '#'));
  }
  return out;
}

std::string HtmlEscape(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      case '\'':
        out += "&#39;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

}  // namespace crossdiff::analysis
