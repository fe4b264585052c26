// report.json (DESIGN.md 3.5): serialisation and parsing with nlohmann::json.
#include <cmath>
#include <nlohmann/json.hpp>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/analysis/report.h"

namespace crossdiff::analysis {
namespace {

using nlohmann::json;

// nlohmann writes NaN/Inf as null too, but being explicit keeps the contract visible.
json Number(double v) { return std::isfinite(v) ? json(v) : json(nullptr); }
json Optional(const std::optional<double>& v) { return v ? Number(*v) : json(nullptr); }

json ExampleToJson(const TopExample& e) {
  json j = {{"activation", Number(e.activation)},
            {"row", e.row},
            {"sequence_id", e.sequence_id},
            {"position", e.position},
            {"token_id", e.token_id},
            {"context_token_ids", e.context_token_ids},
            {"context_index", e.context_index}};
  if (e.has_text) {
    j["token_text"] = e.token_text;
    j["context_text"] = e.context_text;
  } else {
    j["token_text"] = nullptr;
    j["context_text"] = nullptr;
  }
  return j;
}

json LatentToJson(const LatentReport& l) {
  json examples = json::array();
  for (const TopExample& e : l.top_examples) examples.push_back(ExampleToJson(e));
  return {{"index", l.index},
          {"delta", Number(l.delta)},
          {"dec_cos", Number(l.dec_cos)},
          {"base_norm", Number(l.base_norm)},
          {"finetune_norm", Number(l.finetune_norm)},
          {"freq", Number(l.freq)},
          {"max_act", Number(l.max_act)},
          {"tag", TagName(l.tag)},
          {"latent_scaling_computed", l.latent_scaling_computed},
          {"nu_error", Optional(l.nu_error)},
          {"nu_reconstruction", Optional(l.nu_reconstruction)},
          {"top_examples", std::move(examples)}};
}

json SummaryToJson(const ReportSummary& s) {
  json hist = json::array();
  for (int64_t c : s.delta_histogram) hist.push_back(c);
  json fvu = json::array();
  for (double v : s.fvu) fvu.push_back(Number(v));
  return {
      {"models", s.models},
      {"layer", s.layer},
      {"architecture", s.architecture},
      {"num_latents", s.num_latents},
      {"rows", s.rows},
      {"counts", s.counts},
      {"fvu", std::move(fvu)},
      {"l0", Number(s.l0)},
      {"dead_latents", s.dead_latents},
      {"delta_histogram", {{"bin_width", 1.0 / kDeltaHistogramBins}, {"counts", std::move(hist)}}},
      {"latent_scaling", {{"computed_for_tags", s.latent_scaling_tags}}},
      {"decoded_text", s.decoded_text},
      {"crosscoder", s.crosscoder_dir},
      {"activations", s.activations_dir}};
}

json CapabilityToJson(const CapabilityReport& c) {
  return {{"category", c.category},
          {"tokens", c.tokens},
          {"base_mass", Number(c.base_mass)},
          {"finetune_mass", Number(c.finetune_mass)},
          {"change_percent", Optional(c.change_percent)},
          {"latents", c.latents}};
}

// Parsing helpers: every error names the JSON path.
absl::Status Missing(const std::string& path) {
  return absl::InvalidArgumentError(
      absl::StrCat("report.json: missing or mistyped field '", path, "'"));
}

absl::StatusOr<double> GetNumber(const json& j, const char* key, const std::string& path,
                                 bool nullable = false) {
  auto it = j.find(key);
  if (it == j.end()) return Missing(path + "." + key);
  if (it->is_null()) {
    if (nullable) return std::nan("");
    return Missing(path + "." + key);
  }
  if (!it->is_number()) return Missing(path + "." + key);
  return it->get<double>();
}

absl::StatusOr<std::optional<double>> GetOptional(const json& j, const char* key,
                                                  const std::string& path) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return std::optional<double>();
  if (!it->is_number()) return Missing(path + "." + key);
  return std::optional<double>(it->get<double>());
}

}  // namespace

std::string ReportToJson(const Report& report) {
  json latents = json::array();
  for (const LatentReport& l : report.latents) latents.push_back(LatentToJson(l));
  json caps = json::array();
  for (const CapabilityReport& c : report.capabilities) caps.push_back(CapabilityToJson(c));
  json root = {{"format", "crossdiff.report"},
               {"version", 1},
               {"summary", SummaryToJson(report.summary)},
               {"capabilities", std::move(caps)},
               {"latents", std::move(latents)}};
  // Decoded text may hold invalid UTF-8 (a token that ends inside a character): replace it rather
  // than fail the whole report.
  return root.dump(1, ' ', /*ensure_ascii=*/false, json::error_handler_t::replace) + "\n";
}

absl::StatusOr<Report> ReportFromJson(const std::string& json_text) {
  json root = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded() || !root.is_object()) {
    return absl::InvalidArgumentError("report.json: not a JSON object");
  }
  Report r;
  try {
    auto lat = root.find("latents");
    if (lat == root.end() || !lat->is_array()) return Missing("latents");
    for (size_t i = 0; i < lat->size(); ++i) {
      const json& jl = (*lat)[i];
      const std::string path = absl::StrCat("latents[", i, "]");
      if (!jl.is_object() || !jl.contains("index") || !jl["index"].is_number_integer()) {
        return Missing(path + ".index");
      }
      LatentReport l;
      l.index = jl["index"].get<int64_t>();
      auto delta = GetNumber(jl, "delta", path, true);
      if (!delta.ok()) return delta.status();
      l.delta = *delta;
      auto cos = GetNumber(jl, "dec_cos", path, true);
      if (!cos.ok()) return cos.status();
      l.dec_cos = *cos;
      auto freq = GetNumber(jl, "freq", path);
      if (!freq.ok()) return freq.status();
      l.freq = *freq;
      auto max_act = GetNumber(jl, "max_act", path);
      if (!max_act.ok()) return max_act.status();
      l.max_act = *max_act;
      l.base_norm = jl.value("base_norm", 0.0);
      l.finetune_norm = jl.value("finetune_norm", 0.0);
      if (!jl.contains("tag") || !jl["tag"].is_string()) return Missing(path + ".tag");
      auto tag = ParseTag(jl["tag"].get<std::string>());
      if (!tag.ok())
        return absl::InvalidArgumentError(
            absl::StrCat("report.json: ", path, ".tag: ", tag.status().message()));
      l.tag = *tag;
      auto nu_e = GetOptional(jl, "nu_error", path);
      if (!nu_e.ok()) return nu_e.status();
      l.nu_error = *nu_e;
      auto nu_r = GetOptional(jl, "nu_reconstruction", path);
      if (!nu_r.ok()) return nu_r.status();
      l.nu_reconstruction = *nu_r;
      l.latent_scaling_computed = jl.value("latent_scaling_computed", l.nu_error.has_value());
      if (auto ex = jl.find("top_examples"); ex != jl.end() && ex->is_array()) {
        for (const json& je : *ex) {
          TopExample e;
          e.activation = je.value("activation", 0.0);
          e.row = je.value("row", int64_t{0});
          e.sequence_id = je.value("sequence_id", int64_t{0});
          e.position = je.value("position", 0);
          e.token_id = je.value("token_id", 0);
          if (je.contains("context_token_ids")) {
            e.context_token_ids = je["context_token_ids"].get<std::vector<int32_t>>();
          }
          e.context_index = je.value("context_index", 0);
          if (je.contains("context_text") && je["context_text"].is_string()) {
            e.has_text = true;
            e.context_text = je["context_text"].get<std::string>();
            if (je.contains("token_text") && je["token_text"].is_string()) {
              e.token_text = je["token_text"].get<std::string>();
            }
          }
          l.top_examples.push_back(std::move(e));
        }
      } else {
        return Missing(path + ".top_examples");
      }
      r.latents.push_back(std::move(l));
    }

    auto sum = root.find("summary");
    if (sum == root.end() || !sum->is_object()) return Missing("summary");
    ReportSummary& s = r.summary;
    if (sum->contains("models")) s.models = (*sum)["models"].get<std::vector<std::string>>();
    s.layer = sum->value("layer", 0);
    s.architecture = sum->value("architecture", std::string());
    s.rows = sum->value("rows", int64_t{0});
    if (sum->contains("fvu")) {
      for (const json& v : (*sum)["fvu"])
        s.fvu.push_back(v.is_number() ? v.get<double>() : std::nan(""));
    }
    s.l0 = sum->value("l0", 0.0);
    s.dead_latents = sum->value("dead_latents", int64_t{0});
    if (sum->contains("latent_scaling") && (*sum)["latent_scaling"].contains("computed_for_tags")) {
      s.latent_scaling_tags =
          (*sum)["latent_scaling"]["computed_for_tags"].get<std::vector<std::string>>();
    }
    s.decoded_text = sum->value("decoded_text", false);
    s.crosscoder_dir = sum->value("crosscoder", std::string());
    s.activations_dir = sum->value("activations", std::string());

    auto caps = root.find("capabilities");
    if (caps == root.end() || !caps->is_array()) return Missing("capabilities");
    for (size_t i = 0; i < caps->size(); ++i) {
      const json& jc = (*caps)[i];
      const std::string path = absl::StrCat("capabilities[", i, "]");
      if (!jc.contains("category") || !jc["category"].is_string())
        return Missing(path + ".category");
      CapabilityReport c;
      c.category = jc["category"].get<std::string>();
      c.tokens = jc.value("tokens", int64_t{0});
      auto bm = GetNumber(jc, "base_mass", path);
      if (!bm.ok()) return bm.status();
      c.base_mass = *bm;
      auto fm = GetNumber(jc, "finetune_mass", path);
      if (!fm.ok()) return fm.status();
      c.finetune_mass = *fm;
      auto cp = GetOptional(jc, "change_percent", path);
      if (!cp.ok()) return cp.status();
      c.change_percent = *cp;
      if (jc.contains("latents")) c.latents = jc["latents"].get<std::vector<int64_t>>();
      r.capabilities.push_back(std::move(c));
    }
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("report.json: ", e.what()));
  }
  SummarizeTags(r);
  return r;
}

}  // namespace crossdiff::analysis
