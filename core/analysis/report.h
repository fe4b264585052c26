// The diff report (DESIGN.md 3.5, a contract): what `crossdiff analyze` and the worker's analysis
// task produce, and its three renderings (report.json, report.md, report.html). No LibTorch here,
// so the coordinator can hold, serialise and render reports without the engine; docs/report.md
// describes the format field by field.
//
// Plain value types; thread-compatible.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace crossdiff::analysis {

// Which model a latent belongs to, from its relative decoder norm (DESIGN.md section 4).
enum class LatentTag { kBaseOnly, kFinetuneOnly, kShared, kOther };

// Thresholds of DESIGN.md section 4 (a contract): finetune_only delta < 0.1, base_only delta > 0.9,
// shared |delta - 0.5| < 0.1, everything else (including NaN) other.
LatentTag TagForDelta(double delta);
// "base_only", "finetune_only", "shared", "other".
const char* TagName(LatentTag tag);
// Inverse of TagName; INVALID_ARGUMENT naming the string otherwise.
absl::StatusOr<LatentTag> ParseTag(const std::string& name);

// delta = 0.5 * ((|base| - |ft|) / max(|base|, |ft|) + 1): 0 = fine-tune only, 1 = base only.
// Both norms zero (a latent with no decoder at all) gives 0.5 by convention.
double RelativeDecoderNorm(double base_norm, double finetune_norm);

// One of the strongest activations of a latent and the tokens around it.
struct TopExample {
  double activation = 0;
  int64_t row = 0;  // global row of the store
  int64_t sequence_id = 0;
  int32_t position = 0;
  int32_t token_id = 0;
  // Token ids of the rows of the same sequence within the context window, by position; the
  // activating token is context_token_ids[context_index].
  std::vector<int32_t> context_token_ids;
  int32_t context_index = 0;
  // Decoded with the store's tokenizer; empty (and has_text false) when none was available.
  bool has_text = false;
  std::string token_text;
  std::string context_text;
};

struct LatentReport {
  int64_t index = 0;
  double delta = 0;    // relative decoder norm
  double dec_cos = 0;  // cosine between the base and fine-tune decoder vectors (0 when one is zero)
  double base_norm = 0;
  double finetune_norm = 0;
  double freq = 0;     // fraction of rows where the latent is active (> 0)
  double max_act = 0;  // largest activation seen
  LatentTag tag = LatentTag::kOther;
  // Latent scaling (Minder et al.): nu = beta_base / beta_ft, fitted on the error and on the
  // reconstruction targets; unset when not computed for this latent (or undefined: beta_ft = 0).
  bool latent_scaling_computed = false;
  std::optional<double> nu_error;
  std::optional<double> nu_reconstruction;
  std::vector<TopExample> top_examples;  // strongest first
};

// Activation mass of the model-specific latents on one category of probe texts.
struct CapabilityReport {
  std::string category;
  int64_t tokens = 0;        // rows of the store that belong to the category
  double base_mass = 0;      // mean per token of sum_j f_j over base_only latents
  double finetune_mass = 0;  // same over finetune_only latents
  // 100 * (finetune_mass - base_mass) / base_mass; unset when base_mass == 0.
  std::optional<double> change_percent;
  // Model-specific latents with the largest mass on the category, largest first.
  std::vector<int64_t> latents;
};

inline constexpr int kDeltaHistogramBins = 20;

struct ReportSummary {
  std::vector<std::string> models;  // [base, finetune]
  int layer = 0;
  int64_t num_latents = 0;
  int64_t rows = 0;                       // store rows analysed
  std::map<std::string, int64_t> counts;  // per tag name, every tag present (0 when none)
  std::vector<double> fvu;                // per model, in the order of `models`
  double l0 = 0;                          // mean active latents per row
  int64_t dead_latents = 0;               // latents that never fired
  std::array<int64_t, kDeltaHistogramBins> delta_histogram{};  // bins of width 0.05 over [0, 1]
  // Tags of the latents whose latent scaling was computed, e.g. {"finetune_only", "base_only"}.
  std::vector<std::string> latent_scaling_tags;
  bool decoded_text = false;  // top examples carry decoded text
  std::string architecture;
  std::string crosscoder_dir;
  std::string activations_dir;
};

struct Report {
  std::vector<LatentReport> latents;  // by index
  ReportSummary summary;
  std::vector<CapabilityReport> capabilities;  // empty without categories
};

// Fills summary.counts and summary.delta_histogram from `latents` (each latent's tag and delta).
void SummarizeTags(Report& report);

// report.json as text (pretty-printed). Non-finite numbers and unset optionals become null.
std::string ReportToJson(const Report& report);
// Parses what ReportToJson writes (the coordinator re-reads stored reports). INVALID_ARGUMENT
// naming the field when something required is missing or mistyped.
absl::StatusOr<Report> ReportFromJson(const std::string& json_text);
// report.md: counts per tag, the delta histogram as text, the most fine-tune- and base-specific
// latents.
std::string RenderMarkdown(const Report& report);
// report.html: self-contained (inline CSS and SVG, no external assets).
std::string RenderHtml(const Report& report);
// Writes DIR/report.json, DIR/report.md and DIR/report.html (creating DIR), each atomically.
absl::Status WriteReportFiles(const Report& report, const std::string& dir);

}  // namespace crossdiff::analysis
