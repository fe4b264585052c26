#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "core/analysis/report.h"

namespace crossdiff::analysis {

LatentTag TagForDelta(double delta) {
  if (!std::isfinite(delta)) return LatentTag::kOther;
  if (delta < 0.1) return LatentTag::kFinetuneOnly;
  if (delta > 0.9) return LatentTag::kBaseOnly;
  // |delta - 0.5| < 0.1, written as an open interval so that 0.4 and 0.6 themselves are not shared
  // (0.6 - 0.5 rounds below 0.1 in binary floating point).
  if (delta > 0.4 && delta < 0.6) return LatentTag::kShared;
  return LatentTag::kOther;
}

const char* TagName(LatentTag tag) {
  switch (tag) {
    case LatentTag::kBaseOnly:
      return "base_only";
    case LatentTag::kFinetuneOnly:
      return "finetune_only";
    case LatentTag::kShared:
      return "shared";
    case LatentTag::kOther:
      return "other";
  }
  return "other";
}

absl::StatusOr<LatentTag> ParseTag(const std::string& name) {
  for (LatentTag t :
       {LatentTag::kBaseOnly, LatentTag::kFinetuneOnly, LatentTag::kShared, LatentTag::kOther}) {
    if (name == TagName(t)) return t;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown latent tag '", name, "' (expected base_only, finetune_only, shared or other)"));
}

double RelativeDecoderNorm(double base_norm, double finetune_norm) {
  const double larger = std::max(base_norm, finetune_norm);
  if (!(larger > 0)) return 0.5;
  return 0.5 * ((base_norm - finetune_norm) / larger + 1.0);
}

void SummarizeTags(Report& report) {
  auto& s = report.summary;
  s.counts.clear();
  for (LatentTag t :
       {LatentTag::kBaseOnly, LatentTag::kFinetuneOnly, LatentTag::kShared, LatentTag::kOther}) {
    s.counts[TagName(t)] = 0;
  }
  s.delta_histogram.fill(0);
  for (const LatentReport& l : report.latents) {
    ++s.counts[TagName(l.tag)];
    if (!std::isfinite(l.delta)) continue;
    int bin = static_cast<int>(std::floor(l.delta * kDeltaHistogramBins));
    bin = std::clamp(bin, 0, kDeltaHistogramBins - 1);
    ++s.delta_histogram[bin];
  }
  s.num_latents = static_cast<int64_t>(report.latents.size());
}

}  // namespace crossdiff::analysis
