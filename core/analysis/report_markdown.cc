// report.md: the human-readable summary of a diff report.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "core/analysis/report.h"
#include "core/analysis/report_text.h"

namespace crossdiff::analysis {
namespace {

std::string FormatOptional(const std::optional<double>& v) {
  if (!v || !std::isfinite(*v)) return "–";
  return absl::StrFormat("%.3g", *v);
}

// Escapes text for a Markdown table cell: pipes, backticks, line breaks.
std::string CellText(const std::string& s, size_t max_len) {
  std::string out;
  for (char c : s) {
    if (out.size() >= max_len) {
      out += "…";
      break;
    }
    if (c == '|') {
      out += "\\|";
    } else if (c == '\n' || c == '\r' || c == '\t') {
      out += "⏎";
    } else if (c == '`' || c == '*' || c == '_' || c == '<' || c == '>') {
      out += '\\';
      out += c;
    } else {
      out += c;
    }
  }
  return out;
}

std::string ExampleCell(const LatentReport& l) {
  if (l.top_examples.empty()) return "–";
  const TopExample& e = l.top_examples.front();
  if (e.has_text) {
    return absl::StrCat("**", CellText(e.token_text, 40), "** in \"", CellText(e.context_text, 120),
                        "\"");
  }
  return absl::StrCat("token ", e.token_id, " (seq ", e.sequence_id, ", pos ", e.position, ")");
}

void LatentTable(const Report& report, const std::vector<const LatentReport*>& rows,
                 std::string& out) {
  if (rows.empty()) {
    out += "None.\n\n";
    return;
  }
  out +=
      "| latent | delta | dec_cos | freq | max_act | nu_error | nu_reconstruction | top example "
      "|\n";
  out += "|---:|---:|---:|---:|---:|---:|---:|---|\n";
  for (const LatentReport* l : rows) {
    absl::StrAppendFormat(&out, "| %d | %.3f | %.3f | %.2e | %.3g | %s | %s | %s |\n", l->index,
                          l->delta, l->dec_cos, l->freq, l->max_act, FormatOptional(l->nu_error),
                          FormatOptional(l->nu_reconstruction), ExampleCell(*l));
  }
  out += "\n";
}

}  // namespace

std::string RenderMarkdown(const Report& report) {
  const ReportSummary& s = report.summary;
  std::string out = "# crossdiff diff report\n\n";
  const std::string base = s.models.size() > 0 ? s.models[0] : "base";
  const std::string ft = s.models.size() > 1 ? s.models[1] : "fine-tune";
  absl::StrAppend(&out, "Base model `", base, "`, fine-tune `", ft, "`, layer ", s.layer, ". ",
                  s.num_latents, " latents (",
                  s.architecture.empty() ? "crosscoder" : s.architecture, "), ", s.rows,
                  " activation rows analysed.\n\n");

  out += "## Summary\n\n| tag | latents | share |\n|---|---:|---:|\n";
  for (const char* tag : {"finetune_only", "base_only", "shared", "other"}) {
    auto it = s.counts.find(tag);
    const int64_t n = it == s.counts.end() ? 0 : it->second;
    absl::StrAppendFormat(&out, "| %s | %d | %.1f%% |\n", tag, n,
                          s.num_latents > 0 ? 100.0 * n / s.num_latents : 0.0);
  }
  out += "\n";
  std::vector<std::string> fvu;
  for (size_t m = 0; m < s.fvu.size(); ++m) {
    fvu.push_back(absl::StrFormat(
        "%s %.4f", m < s.models.size() ? s.models[m] : absl::StrCat("model ", m), s.fvu[m]));
  }
  absl::StrAppendFormat(&out,
                        "Fraction of variance unexplained: %s. L0 %.2f active latents per token; "
                        "%d dead latents.\n\n",
                        fvu.empty() ? "n/a" : absl::StrJoin(fvu, ", "), s.l0, s.dead_latents);
  out +=
      "Tags come from the relative decoder norm delta (0 = only the fine-tune's decoder is "
      "non-zero, "
      "1 = only the base's): finetune_only delta < 0.1, base_only delta > 0.9, shared |delta - "
      "0.5| < 0.1.\n\n";

  out += "## Relative decoder norm histogram\n\n```\n";
  out += DeltaHistogramText(s.delta_histogram, 50);
  out += "```\n\n";

  std::vector<const LatentReport*> live;
  for (const LatentReport& l : report.latents) {
    if (l.freq > 0) live.push_back(&l);
  }
  // The latents with `tag`, most extreme first; when none has it, the nearest live latents, so the
  // reader still sees which way the diff leans (with a note saying no latent passed the threshold).
  auto pick = [&](LatentTag tag, bool ascending, bool* nearest) {
    std::vector<const LatentReport*> rows;
    for (const LatentReport* l : live) {
      if (l->tag == tag) rows.push_back(l);
    }
    *nearest = rows.empty();
    if (*nearest) rows = live;
    std::stable_sort(rows.begin(), rows.end(), [&](const LatentReport* a, const LatentReport* b) {
      if (a->delta != b->delta) return ascending ? a->delta < b->delta : a->delta > b->delta;
      return a->freq > b->freq;
    });
    if (rows.size() > (*nearest ? 5u : 25u)) rows.resize(*nearest ? 5u : 25u);
    return rows;
  };
  auto table = [&](LatentTag tag, bool ascending, const char* threshold) {
    bool nearest = false;
    auto rows = pick(tag, ascending, &nearest);
    if (nearest && !rows.empty()) {
      out += absl::StrCat("No live latent has delta ", threshold, "; the nearest are:\n\n");
    }
    LatentTable(report, rows, out);
  };
  out +=
      "## Most fine-tune-specific latents\n\nLowest delta first (live latents only). nu = "
      "beta_base / "
      "beta_ft from latent scaling: near 0 means the base model does not use the direction.\n\n";
  table(LatentTag::kFinetuneOnly, true, "< 0.1");
  out +=
      "## Most base-specific latents\n\nHighest delta first. nu = beta_base / beta_ft: large "
      "values "
      "(1/nu near 0) mean the fine-tune does not use the direction.\n\n";
  table(LatentTag::kBaseOnly, false, "> 0.9");

  out += "## Latent scaling\n\n";
  if (s.latent_scaling_tags.empty()) {
    out += "Not computed.\n\n";
  } else {
    absl::StrAppend(&out, "nu_error and nu_reconstruction were computed for the latents tagged ",
                    absl::StrJoin(s.latent_scaling_tags, ", "),
                    "; they are null for every other latent and for latents that never fired.\n\n");
  }

  out += "## Capabilities\n\n";
  if (report.capabilities.empty()) {
    out += "No categories were given (`--categories`), so no capability attribution.\n";
  } else {
    out += "Mean activation mass per token of the model-specific latents on each category.\n\n";
    out += "| category | tokens | base mass | fine-tune mass | change | top latents |\n";
    out += "|---|---:|---:|---:|---:|---|\n";
    for (const CapabilityReport& c : report.capabilities) {
      std::vector<std::string> lat;
      for (size_t i = 0; i < c.latents.size() && i < 8; ++i)
        lat.push_back(absl::StrCat(c.latents[i]));
      absl::StrAppendFormat(&out, "| %s | %d | %.4g | %.4g | %s | %s |\n", CellText(c.category, 60),
                            c.tokens, c.base_mass, c.finetune_mass,
                            c.change_percent ? absl::StrFormat("%+.1f%%", *c.change_percent) : "–",
                            absl::StrJoin(lat, ", "));
    }
  }
  return out;
}

}  // namespace crossdiff::analysis
