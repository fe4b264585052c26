#include "server/report_reader.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "core/common/status_macros.h"

namespace crossdiff::server {
namespace {

using nlohmann::json;

double NumberOr(const json& object, const char* key, double fallback) {
  auto it = object.find(key);
  if (it == object.end() || !it->is_number()) return fallback;
  return it->get<double>();
}

int64_t IntOr(const json& object, const char* key, int64_t fallback) {
  auto it = object.find(key);
  if (it == object.end() || !it->is_number()) return fallback;
  return it->get<int64_t>();
}

std::string StringOr(const json& object, const char* key) {
  auto it = object.find(key);
  if (it == object.end() || !it->is_string()) return "";
  return it->get<std::string>();
}

}  // namespace

absl::StatusOr<std::string> ReadTextFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot read"));
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

absl::StatusOr<ParsedReport> ParseReportJson(const std::string& text, const std::string& source) {
  json root = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded() || !root.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": not a JSON object"));
  }
  auto latents = root.find("latents");
  if (latents == root.end() || !latents->is_array()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": latents: missing or not an array"));
  }
  ParsedReport report;
  report.latents.reserve(latents->size());
  for (size_t i = 0; i < latents->size(); ++i) {
    const json& item = (*latents)[i];
    if (!item.is_object() || !item.contains("index") || !item["index"].is_number_integer()) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": latents[", i, "].index: missing or not an integer"));
    }
    v1::LatentStats stats;
    stats.set_index(item["index"].get<int64_t>());
    stats.set_delta(NumberOr(item, "delta", std::nan("")));
    stats.set_dec_cos(NumberOr(item, "dec_cos", std::nan("")));
    stats.set_freq(NumberOr(item, "freq", 0));
    stats.set_max_act(NumberOr(item, "max_act", 0));
    stats.set_base_norm(NumberOr(item, "base_norm", 0));
    stats.set_finetune_norm(NumberOr(item, "finetune_norm", 0));
    stats.set_tag(StringOr(item, "tag"));
    bool has_nu = (item.contains("nu_error") && item["nu_error"].is_number()) ||
                  (item.contains("nu_reconstruction") && item["nu_reconstruction"].is_number());
    stats.set_has_nu(has_nu);
    stats.set_nu_error(NumberOr(item, "nu_error", std::nan("")));
    stats.set_nu_reconstruction(NumberOr(item, "nu_reconstruction", std::nan("")));
    if (auto examples = item.find("top_examples"); examples != item.end() && examples->is_array()) {
      for (const json& e : *examples) {
        if (!e.is_object()) continue;
        auto* example = stats.add_top_examples();
        example->set_activation(NumberOr(e, "activation", 0));
        example->set_row(IntOr(e, "row", 0));
        example->set_sequence_id(IntOr(e, "sequence_id", 0));
        example->set_position(static_cast<int32_t>(IntOr(e, "position", 0)));
        example->set_token_id(static_cast<int32_t>(IntOr(e, "token_id", 0)));
        example->set_context_index(static_cast<int32_t>(IntOr(e, "context_index", 0)));
        if (auto ids = e.find("context_token_ids"); ids != e.end() && ids->is_array()) {
          for (const json& id : *ids) {
            if (id.is_number_integer()) example->add_context_token_ids(id.get<int32_t>());
          }
        }
        example->set_token_text(StringOr(e, "token_text"));
        example->set_context_text(StringOr(e, "context_text"));
      }
    }
    report.latents.push_back(std::move(stats));
  }
  if (auto summary = root.find("summary"); summary != root.end() && summary->is_object()) {
    auto& s = report.summary;
    if (auto models = summary->find("models"); models != summary->end() && models->is_array()) {
      for (const json& m : *models) {
        if (m.is_string()) s.add_models(m.get<std::string>());
      }
    }
    s.set_layer(static_cast<int32_t>(IntOr(*summary, "layer", 0)));
    s.set_num_latents(IntOr(*summary, "num_latents", static_cast<int64_t>(report.latents.size())));
    if (auto counts = summary->find("counts"); counts != summary->end() && counts->is_object()) {
      for (auto it = counts->begin(); it != counts->end(); ++it) {
        if (it.value().is_number_integer())
          (*s.mutable_counts())[it.key()] = it.value().get<int64_t>();
      }
    }
    if (auto fvu = summary->find("fvu"); fvu != summary->end() && fvu->is_array()) {
      for (const json& v : *fvu) s.add_fvu(v.is_number() ? v.get<double>() : std::nan(""));
    }
    s.set_l0(NumberOr(*summary, "l0", 0));
    s.set_dead_latents(IntOr(*summary, "dead_latents", 0));
  }
  if (auto caps = root.find("capabilities"); caps != root.end() && caps->is_array()) {
    for (const json& c : *caps) {
      if (!c.is_object()) continue;
      v1::Capability cap;
      cap.set_category(StringOr(c, "category"));
      cap.set_base_mass(NumberOr(c, "base_mass", 0));
      cap.set_finetune_mass(NumberOr(c, "finetune_mass", 0));
      cap.set_has_change_percent(c.contains("change_percent") && c["change_percent"].is_number());
      cap.set_change_percent(NumberOr(c, "change_percent", 0));
      if (auto ids = c.find("latents"); ids != c.end() && ids->is_array()) {
        for (const json& id : *ids) {
          if (id.is_number_integer()) cap.add_latents(id.get<int64_t>());
        }
      }
      report.capabilities.push_back(std::move(cap));
    }
  }
  return report;
}

absl::StatusOr<std::shared_ptr<const ParsedReport>> ReportCache::Get(
    const std::string& report_dir) {
  const std::string path = report_dir + "/report.json";
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = cache_.find(path);
    if (it != cache_.end()) return it->second;
  }
  ASSIGN_OR_RETURN(std::string text, ReadTextFile(path));
  ASSIGN_OR_RETURN(ParsedReport parsed, ParseReportJson(text, path));
  auto shared = std::make_shared<const ParsedReport>(std::move(parsed));
  std::lock_guard<std::mutex> lock(mu_);
  if (cache_.emplace(path, shared).second) {
    order_.push_back(path);
    if (order_.size() > capacity_) {
      cache_.erase(order_.front());
      order_.erase(order_.begin());
    }
  }
  return shared;
}

absl::StatusOr<std::vector<const v1::LatentStats*>> SelectLatents(const ParsedReport& report,
                                                                  const std::string& tag,
                                                                  v1::LatentOrder order) {
  if (!tag.empty() && tag != "base_only" && tag != "finetune_only" && tag != "shared" &&
      tag != "other") {
    return absl::InvalidArgumentError(
        absl::StrCat("tag: must be base_only, finetune_only, shared or other, got '", tag, "'"));
  }
  std::vector<const v1::LatentStats*> selected;
  for (const auto& latent : report.latents) {
    if (tag.empty() || latent.tag() == tag) selected.push_back(&latent);
  }
  const bool descending = order == v1::LATENT_ORDER_DELTA_DESCENDING;
  std::stable_sort(selected.begin(), selected.end(),
                   [&](const v1::LatentStats* a, const v1::LatentStats* b) {
                     // NaN deltas (undefined) go last in either order.
                     bool a_nan = std::isnan(a->delta()), b_nan = std::isnan(b->delta());
                     if (a_nan != b_nan) return b_nan;
                     if (a->delta() != b->delta() && !a_nan)
                       return descending ? a->delta() > b->delta() : a->delta() < b->delta();
                     return a->index() < b->index();
                   });
  return selected;
}

}  // namespace crossdiff::server
