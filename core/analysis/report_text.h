// Small text helpers shared by the report renderers (internal to core/analysis).
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include "core/analysis/report.h"

namespace crossdiff::analysis {

// The delta histogram as lines "[0.00, 0.05)  123 ####", bars scaled to `width` characters.
std::string DeltaHistogramText(const std::array<int64_t, kDeltaHistogramBins>& bins, int width);

// Escapes &, <, >, " and ' for HTML text and attribute values.
std::string HtmlEscape(const std::string& s);

}  // namespace crossdiff::analysis
