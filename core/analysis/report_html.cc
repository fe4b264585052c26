// report.html: one self-contained page (inline CSS and SVG; no scripts, fonts or external assets).
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

constexpr int kPlotW = 560, kPlotH = 300, kMarginL = 50, kMarginB = 36, kMarginT = 14,
              kMarginR = 14;
constexpr size_t kMaxScatterPoints = 20000;

const char* TagColor(LatentTag tag) {
  switch (tag) {
    case LatentTag::kFinetuneOnly:
      return "#d9480f";
    case LatentTag::kBaseOnly:
      return "#1c7ed6";
    case LatentTag::kShared:
      return "#2b8a3e";
    case LatentTag::kOther:
      return "#868e96";
  }
  return "#868e96";
}

std::string Axes(const std::string& x_label, const std::string& y_label, double y_min,
                 double y_max) {
  const int x0 = kMarginL, y0 = kPlotH - kMarginB, x1 = kPlotW - kMarginR, y1 = kMarginT;
  std::string s = absl::StrFormat(
      "<line x1='%d' y1='%d' x2='%d' y2='%d' stroke='#333'/>"
      "<line x1='%d' y1='%d' x2='%d' y2='%d' stroke='#333'/>",
      x0, y0, x1, y0, x0, y0, x0, y1);
  for (int i = 0; i <= 4; ++i) {
    const double fx = i / 4.0;
    const int px = x0 + static_cast<int>(fx * (x1 - x0));
    absl::StrAppendFormat(&s, "<text x='%d' y='%d' font-size='11' text-anchor='middle'>%.2f</text>",
                          px, y0 + 14, fx);
    const int py = y0 - static_cast<int>(fx * (y0 - y1));
    absl::StrAppendFormat(&s, "<text x='%d' y='%d' font-size='11' text-anchor='end'>%.3g</text>",
                          x0 - 4, py + 4, y_min + fx * (y_max - y_min));
  }
  absl::StrAppendFormat(&s, "<text x='%d' y='%d' font-size='12' text-anchor='middle'>%s</text>",
                        (x0 + x1) / 2, kPlotH - 4, HtmlEscape(x_label));
  absl::StrAppendFormat(&s,
                        "<text x='12' y='%d' font-size='12' text-anchor='middle' "
                        "transform='rotate(-90 12 %d)'>%s</text>",
                        (y0 + y1) / 2, (y0 + y1) / 2, HtmlEscape(y_label));
  return s;
}

std::string HistogramSvg(const ReportSummary& s) {
  int64_t largest = 1;
  for (int64_t c : s.delta_histogram) largest = std::max(largest, c);
  const int x0 = kMarginL, y0 = kPlotH - kMarginB, x1 = kPlotW - kMarginR, y1 = kMarginT;
  const double bw = static_cast<double>(x1 - x0) / kDeltaHistogramBins;
  std::string svg = absl::StrFormat(
      "<svg xmlns='http://www.w3.org/2000/svg' width='%d' height='%d' role='img' "
      "aria-label='delta histogram'>",
      kPlotW, kPlotH);
  for (int i = 0; i < kDeltaHistogramBins; ++i) {
    const double delta_mid = (i + 0.5) / kDeltaHistogramBins;
    const double h = static_cast<double>(s.delta_histogram[i]) / largest * (y0 - y1);
    absl::StrAppendFormat(&svg,
                          "<rect x='%.1f' y='%.1f' width='%.1f' height='%.1f' fill='%s'>"
                          "<title>[%.2f, %.2f): %d latents</title></rect>",
                          x0 + i * bw + 1, y0 - h, bw - 2, h, TagColor(TagForDelta(delta_mid)),
                          static_cast<double>(i) / kDeltaHistogramBins,
                          static_cast<double>(i + 1) / kDeltaHistogramBins, s.delta_histogram[i]);
  }
  svg += Axes("relative decoder norm delta (0 = fine-tune only, 1 = base only)", "latents", 0,
              static_cast<double>(largest));
  svg += "</svg>";
  return svg;
}

std::string ScatterSvg(const Report& report, size_t* shown) {
  const int x0 = kMarginL, y0 = kPlotH - kMarginB, x1 = kPlotW - kMarginR, y1 = kMarginT;
  std::string svg = absl::StrFormat(
      "<svg xmlns='http://www.w3.org/2000/svg' width='%d' height='%d' role='img' "
      "aria-label='delta versus decoder cosine'>",
      kPlotW, kPlotH);
  const size_t n = report.latents.size();
  const size_t stride = n > kMaxScatterPoints ? (n + kMaxScatterPoints - 1) / kMaxScatterPoints : 1;
  *shown = 0;
  for (size_t i = 0; i < n; i += stride) {
    const LatentReport& l = report.latents[i];
    if (!std::isfinite(l.delta) || !std::isfinite(l.dec_cos)) continue;
    const double px = x0 + std::clamp(l.delta, 0.0, 1.0) * (x1 - x0);
    const double py = y0 - (std::clamp(l.dec_cos, -1.0, 1.0) + 1.0) / 2.0 * (y0 - y1);
    absl::StrAppendFormat(&svg,
                          "<circle cx='%.1f' cy='%.1f' r='2' fill='%s' fill-opacity='0.6'>"
                          "<title>latent %d: delta %.3f, cos %.3f</title></circle>",
                          px, py, TagColor(l.tag), l.index, l.delta, l.dec_cos);
    ++*shown;
  }
  svg += Axes("relative decoder norm delta", "cosine of the two decoder vectors", -1, 1);
  svg += "</svg>";
  return svg;
}

std::string Optional(const std::optional<double>& v) {
  return v && std::isfinite(*v) ? absl::StrFormat("%.3g", *v) : "–";
}

std::string ExampleHtml(const LatentReport& l) {
  std::vector<std::string> parts;
  for (size_t i = 0; i < l.top_examples.size() && i < 3; ++i) {
    const TopExample& e = l.top_examples[i];
    if (e.has_text) {
      parts.push_back(absl::StrFormat("<b>%s</b> <span class='ctx'>%s</span> (%.3g)",
                                      HtmlEscape(e.token_text), HtmlEscape(e.context_text),
                                      e.activation));
    } else {
      parts.push_back(absl::StrFormat("token %d (seq %d, pos %d, %.3g)", e.token_id, e.sequence_id,
                                      e.position, e.activation));
    }
  }
  return parts.empty() ? "–" : absl::StrJoin(parts, "<br>");
}

std::string LatentTable(const std::vector<const LatentReport*>& rows) {
  if (rows.empty()) return "<p>None.</p>";
  std::string t =
      "<table><tr><th>latent</th><th>delta</th><th>dec_cos</th><th>freq</th><th>max_act</th>"
      "<th>nu_error</th><th>nu_reconstruction</th><th>top examples</th></tr>";
  for (const LatentReport* l : rows) {
    absl::StrAppendFormat(&t,
                          "<tr><td>%d</td><td>%.3f</td><td>%.3f</td><td>%.2e</td><td>%.3g</td>"
                          "<td>%s</td><td>%s</td><td>%s</td></tr>",
                          l->index, l->delta, l->dec_cos, l->freq, l->max_act,
                          Optional(l->nu_error), Optional(l->nu_reconstruction), ExampleHtml(*l));
  }
  return t + "</table>";
}

}  // namespace

std::string RenderHtml(const Report& report) {
  const ReportSummary& s = report.summary;
  std::string h =
      "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>crossdiff diff "
      "report</title><style>body{font-family:sans-serif;max-width:1100px;margin:2em "
      "auto;color:#222}"
      "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;"
      "padding:3px 6px;vertical-align:top}th{background:#f1f3f5}.ctx{color:#555}"
      ".plots{display:flex;flex-wrap:wrap;gap:1em}pre{background:#f8f9fa;padding:.5em}"
      "</style></head><body>\n<h1>crossdiff diff report</h1>\n";
  const std::string base = s.models.size() > 0 ? s.models[0] : "base";
  const std::string ft = s.models.size() > 1 ? s.models[1] : "fine-tune";
  absl::StrAppendFormat(&h,
                        "<p>Base model <code>%s</code>, fine-tune <code>%s</code>, layer %d. %d "
                        "latents, %d activation rows analysed. L0 %.2f, %d dead latents.</p>\n",
                        HtmlEscape(base), HtmlEscape(ft), s.layer, s.num_latents, s.rows, s.l0,
                        s.dead_latents);
  h += "<table><tr><th>tag</th><th>latents</th></tr>";
  for (const char* tag : {"finetune_only", "base_only", "shared", "other"}) {
    auto it = s.counts.find(tag);
    absl::StrAppendFormat(&h, "<tr><td>%s</td><td>%d</td></tr>", tag,
                          it == s.counts.end() ? 0 : it->second);
  }
  h += "</table>";
  if (!s.fvu.empty()) {
    h += "<p>Fraction of variance unexplained: ";
    for (size_t m = 0; m < s.fvu.size(); ++m) {
      absl::StrAppendFormat(
          &h, "%s%s %.4f", m ? ", " : "",
          HtmlEscape(m < s.models.size() ? s.models[m] : absl::StrCat("model ", m)), s.fvu[m]);
    }
    h += "</p>\n";
  }
  size_t shown = 0;
  const std::string scatter = ScatterSvg(report, &shown);
  h += "<div class='plots'><figure>" + HistogramSvg(s) +
       "<figcaption>Relative decoder norm per latent. Orange: finetune_only, blue: base_only, "
       "green: "
       "shared.</figcaption></figure><figure>" +
       scatter +
       absl::StrFormat(
           "<figcaption>Delta vs cosine between the two decoder vectors (%d of %d "
           "latents).</figcaption></figure></div>\n",
           shown, report.latents.size());

  std::vector<const LatentReport*> ft_rows, base_rows;
  for (const LatentReport& l : report.latents) {
    if (l.freq <= 0) continue;
    if (l.tag == LatentTag::kFinetuneOnly) ft_rows.push_back(&l);
    if (l.tag == LatentTag::kBaseOnly) base_rows.push_back(&l);
  }
  std::stable_sort(
      ft_rows.begin(), ft_rows.end(),
      [](const LatentReport* a, const LatentReport* b) { return a->delta < b->delta; });
  std::stable_sort(
      base_rows.begin(), base_rows.end(),
      [](const LatentReport* a, const LatentReport* b) { return a->delta > b->delta; });
  if (ft_rows.size() > 50) ft_rows.resize(50);
  if (base_rows.size() > 50) base_rows.resize(50);
  h += "<h2>Most fine-tune-specific latents</h2>" + LatentTable(ft_rows);
  h += "<h2>Most base-specific latents</h2>" + LatentTable(base_rows);
  h += "<h2>Capabilities</h2>";
  if (report.capabilities.empty()) {
    h += "<p>No categories were given.</p>";
  } else {
    h += "<table><tr><th>category</th><th>tokens</th><th>base mass</th><th>fine-tune mass</th>"
         "<th>change</th><th>top latents</th></tr>";
    for (const CapabilityReport& c : report.capabilities) {
      std::vector<std::string> lat;
      for (size_t i = 0; i < c.latents.size() && i < 8; ++i)
        lat.push_back(absl::StrCat(c.latents[i]));
      absl::StrAppendFormat(
          &h, "<tr><td>%s</td><td>%d</td><td>%.4g</td><td>%.4g</td><td>%s</td><td>%s</td></tr>",
          HtmlEscape(c.category), c.tokens, c.base_mass, c.finetune_mass,
          c.change_percent ? absl::StrFormat("%+.1f%%", *c.change_percent) : "–",
          absl::StrJoin(lat, ", "));
    }
    h += "</table>";
  }
  h += "</body></html>\n";
  return h;
}

}  // namespace crossdiff::analysis
