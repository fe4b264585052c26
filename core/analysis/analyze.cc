#include "core/analysis/analyze.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <numeric>
#include <unordered_map>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/activations/store.h"
#include "core/analysis/latent_statistics.h"
#include "core/analysis/probe_categories.h"
#include "core/analysis/store_tokens.h"
#include "core/common/compute_threads.h"
#include "core/common/status_macros.h"
#include "core/common/torch_status.h"
#include "core/crosscoder/crosscoder.h"
#ifdef CROSSDIFF_HAVE_TOKENIZER
#include "core/tokenizer/tokenizer.h"
#endif

namespace crossdiff::analysis {
namespace {

namespace fs = std::filesystem;

// Decodes token ids to text when a tokenizer is available.
class TextDecoder {
 public:
  static absl::StatusOr<TextDecoder> Create(const AnalyzeOptions& options,
                                            const activations::Manifest& manifest) {
    TextDecoder d;
#ifdef CROSSDIFF_HAVE_TOKENIZER
    if (!options.tokenizer_dir.empty()) {
      auto tok = tokenizer::Tokenizer::Load(options.tokenizer_dir);
      if (!tok.ok()) {
        return absl::Status(tok.status().code(), absl::StrCat("--tokenizer ", options.tokenizer_dir,
                                                              ": ", tok.status().message()));
      }
      d.tokenizer_ = std::move(*tok);
      return d;
    }
    for (const std::string& dir : CandidateDirs(manifest)) {
      std::error_code ec;
      if (dir.empty() || !fs::is_directory(dir, ec)) continue;
      auto tok = tokenizer::Tokenizer::Load(dir);
      if (tok.ok()) {
        d.tokenizer_ = std::move(*tok);
        break;
      }
    }
#else
    if (!options.tokenizer_dir.empty()) {
      return absl::FailedPreconditionError(
          "--tokenizer: this build has no tokenizer module (core/tokenizer)");
    }
#endif
    return d;
  }

  bool available() const {
#ifdef CROSSDIFF_HAVE_TOKENIZER
    return tokenizer_ != nullptr;
#else
    return false;
#endif
  }

  std::string Decode(const std::vector<int32_t>& ids) const {
#ifdef CROSSDIFF_HAVE_TOKENIZER
    if (tokenizer_) return tokenizer_->Decode(ids);
#endif
    return {};
  }

 private:
  // Model directories the store's manifest names, most specific first.
  static std::vector<std::string> CandidateDirs(const activations::Manifest& manifest) {
    std::vector<std::string> dirs;
    nlohmann::json extra = nlohmann::json::parse(manifest.extra_json, nullptr, false);
    if (extra.is_object()) {
      for (const char* key :
           {"tokenizer_dir", "tokenizer", "base_dir", "base_model_dir", "base_model", "base"}) {
        auto it = extra.find(key);
        if (it != extra.end() && it->is_string()) dirs.push_back(it->get<std::string>());
      }
      for (const char* key : {"model_dirs", "models"}) {
        auto it = extra.find(key);
        if (it != extra.end() && it->is_array()) {
          for (const auto& v : *it) {
            if (v.is_string()) dirs.push_back(v.get<std::string>());
          }
        }
      }
    }
    for (const std::string& m : manifest.models) dirs.push_back(m);
    return dirs;
  }

#ifdef CROSSDIFF_HAVE_TOKENIZER
  std::shared_ptr<tokenizer::Tokenizer> tokenizer_;
#endif
};

// Which categories each sequence belongs to, from sequence ids and (with a tokenizer) substrings of
// the decoded sequence text.
absl::StatusOr<std::unordered_map<int64_t, std::vector<int32_t>>> AssignSequences(
    const std::vector<ProbeCategory>& categories, const StoreTokens& tokens,
    const TextDecoder& decoder, const std::string& source) {
  std::unordered_map<int64_t, std::vector<int32_t>> members;
  auto add = [&](int64_t seq, int32_t c) {
    auto& v = members[seq];
    if (std::find(v.begin(), v.end(), c) == v.end()) v.push_back(c);
  };
  bool any_substrings = false;
  for (size_t c = 0; c < categories.size(); ++c) {
    for (int64_t seq : categories[c].sequence_ids) add(seq, static_cast<int32_t>(c));
    if (!categories[c].substrings.empty()) {
      any_substrings = true;
      if (!decoder.available()) {
        return absl::FailedPreconditionError(
            absl::StrCat(source, ": category '", categories[c].name,
                         "' matches substrings, but no tokenizer was found for the store (pass "
                         "--tokenizer DIR)"));
      }
    }
  }
  if (!any_substrings) return members;
  // One pass over the store's tokens: a sequence is decoded when its run of rows ends. A sequence
  // stored in several runs (a shuffled store) is matched run by run.
  std::vector<std::pair<int32_t, int32_t>> run;  // (position, token)
  int64_t run_seq = 0;
  auto flush = [&]() {
    if (run.empty()) return;
    std::stable_sort(run.begin(), run.end());
    std::vector<int32_t> ids;
    ids.reserve(run.size());
    for (const auto& [pos, tok] : run) ids.push_back(tok);
    const std::string text = decoder.Decode(ids);
    for (size_t c = 0; c < categories.size(); ++c) {
      for (const std::string& sub : categories[c].substrings) {
        if (text.find(sub) != std::string::npos) {
          add(run_seq, static_cast<int32_t>(c));
          break;
        }
      }
    }
    run.clear();
  };
  for (int64_t r = 0; r < tokens.rows(); ++r) {
    const TokenRow t = tokens.Row(r);
    if (!run.empty() && t.sequence_id != run_seq) flush();
    run_seq = t.sequence_id;
    run.emplace_back(t.position, t.token_id);
  }
  flush();
  return members;
}

// The crosscoder's reconstruction of a batch. Sparse latents (BatchTopK keeps k of F per row) are
// decoded through a sparse-dense product, which skips the F - k inactive rows of the decoder.
at::Tensor DecodeBatch(const crosscoder::Crosscoder& cc, const at::Tensor& f, double max_density) {
  const int64_t active = (f != 0).sum().item<int64_t>();
  if (static_cast<double>(active) > max_density * static_cast<double>(f.numel())) {
    return cc.Decode(f);
  }
  const at::Tensor flat = at::mm(f.to(at::kFloat).to_sparse(), cc.decoder_matrix()) +
                          cc.b_dec().reshape({1, cc.M() * cc.d()});
  return flat.view({f.size(0), cc.M(), cc.d()});
}

absl::Status CheckInputs(const AnalyzeOptions& o) {
  if (o.batch_rows < 1) return absl::InvalidArgumentError("batch_rows must be >= 1");
  if (o.top_k < 1 || o.top_k > 1000) {
    return absl::InvalidArgumentError(absl::StrCat("top_k must be in [1, 1000], got ", o.top_k));
  }
  if (o.context_tokens < 0 || o.context_tokens > 512) {
    return absl::InvalidArgumentError(
        absl::StrCat("context_tokens must be in [0, 512], got ", o.context_tokens));
  }
  if (o.max_rows < 0) return absl::InvalidArgumentError("max_rows must be >= 0");
  std::error_code ec;
  if (o.crosscoder_dir.empty() || !fs::is_directory(o.crosscoder_dir, ec)) {
    return absl::NotFoundError(
        absl::StrCat("crosscoder directory '", o.crosscoder_dir, "' does not exist"));
  }
  if (o.activations_dir.empty() || !fs::is_directory(o.activations_dir, ec)) {
    return absl::NotFoundError(
        absl::StrCat("activation store '", o.activations_dir, "' does not exist"));
  }
  return absl::OkStatus();
}

// Checks that the store can be analysed with the crosscoder before any weights are read.
absl::Status CheckCompatible(const crosscoder::CrosscoderConfig& config,
                             const activations::Manifest& manifest, const AnalyzeOptions& o) {
  if (config.num_models != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat(o.crosscoder_dir, "/config.json: num_models is ", config.num_models,
                     "; the diff analysis needs a two-model (base, fine-tune) crosscoder"));
  }
  if (static_cast<int64_t>(manifest.models.size()) != config.num_models) {
    return absl::InvalidArgumentError(
        absl::StrCat(o.activations_dir, "/manifest.json: models has ", manifest.models.size(),
                     " entries but the crosscoder in ", o.crosscoder_dir, " was trained on ",
                     config.num_models));
  }
  if (manifest.d_model != config.activation_dim) {
    return absl::InvalidArgumentError(
        absl::StrCat(o.activations_dir, "/manifest.json: d_model ", manifest.d_model,
                     " does not match the crosscoder's activation_dim ", config.activation_dim,
                     " (", o.crosscoder_dir, ")"));
  }
  if (manifest.rows <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(o.activations_dir, "/manifest.json: the store has no rows"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<Report> RunAnalysis(const AnalyzeOptions& options,
                                   ProgressMeter::Callback progress) {
  RETURN_IF_ERROR(CheckInputs(options));
  SetComputeThreads(static_cast<int>(options.threads));

  ASSIGN_OR_RETURN(crosscoder::CrosscoderConfig config,
                   crosscoder::LoadCrosscoderConfig(options.crosscoder_dir));
  ASSIGN_OR_RETURN(std::unique_ptr<activations::StoreReader> store,
                   activations::StoreReader::Open(options.activations_dir));
  const activations::Manifest& manifest = store->manifest();
  RETURN_IF_ERROR(CheckCompatible(config, manifest, options));
  ASSIGN_OR_RETURN(crosscoder::Crosscoder cc, crosscoder::Crosscoder::Load(options.crosscoder_dir));
  ASSIGN_OR_RETURN(std::unique_ptr<StoreTokens> tokens,
                   StoreTokens::Open(options.activations_dir, manifest));
  ASSIGN_OR_RETURN(TextDecoder decoder, TextDecoder::Create(options, manifest));

  std::vector<ProbeCategory> categories;
  std::unordered_map<int64_t, std::vector<int32_t>> members;
  if (!options.categories_file.empty()) {
    ASSIGN_OR_RETURN(categories, LoadProbeCategories(options.categories_file));
    ASSIGN_OR_RETURN(members,
                     AssignSequences(categories, *tokens, decoder, options.categories_file));
  }

  return GuardTorch("analyze", [&]() -> absl::StatusOr<Report> {
    at::NoGradGuard no_grad;
    const int64_t F = cc.F();
    Report report;

    // Decoder geometry: norms, relative norm, cosine, tags.
    const at::Tensor w_dec = cc.W_dec().to(at::kFloat).contiguous();                    // [2, F, d]
    const at::Tensor norms = w_dec.norm(2, /*dim=*/2).to(at::kDouble).contiguous();     // [2, F]
    const at::Tensor dots = (w_dec[0] * w_dec[1]).sum(1).to(at::kDouble).contiguous();  // [F]
    const double* nb = norms[0].data_ptr<double>();
    const double* nf = norms[1].data_ptr<double>();
    const double* dp = dots.data_ptr<double>();
    report.latents.resize(F);
    std::vector<int64_t> scaling;
    for (int64_t j = 0; j < F; ++j) {
      LatentReport& l = report.latents[j];
      l.index = j;
      l.base_norm = nb[j];
      l.finetune_norm = nf[j];
      l.delta = RelativeDecoderNorm(nb[j], nf[j]);
      l.dec_cos = (nb[j] > 0 && nf[j] > 0) ? dp[j] / (nb[j] * nf[j]) : 0.0;
      l.tag = TagForDelta(l.delta);
      const bool specific = l.tag == LatentTag::kBaseOnly || l.tag == LatentTag::kFinetuneOnly;
      if (options.latent_scaling == LatentScalingScope::kAll ||
          (options.latent_scaling == LatentScalingScope::kModelSpecific && specific)) {
        scaling.push_back(j);
      }
    }

    LatentStatisticsAccumulator::Options acc_opts;
    acc_opts.top_k = options.top_k;
    acc_opts.scaling_latents =
        at::from_blob(scaling.data(), {static_cast<int64_t>(scaling.size())}, at::kLong).clone();
    acc_opts.num_categories = static_cast<int64_t>(categories.size());
    ASSIGN_OR_RETURN(LatentStatisticsAccumulator acc,
                     LatentStatisticsAccumulator::Create(w_dec, acc_opts));

    // The streaming pass.
    const int64_t total =
        options.max_rows > 0 ? std::min(options.max_rows, manifest.rows) : manifest.rows;
    ProgressMeter meter("analyze", "tokens", total, options.progress_out);
    if (progress) meter.set_callback(progress);
    const int64_t C = static_cast<int64_t>(categories.size());
    for (int64_t begin = 0; begin < total; begin += options.batch_rows) {
      const int64_t end = std::min(total, begin + options.batch_rows);
      ASSIGN_OR_RETURN(activations::ActivationBatch batch, store->ReadRows(begin, end));
      const at::Tensor xn = cc.Normalize(batch.activations);
      const at::Tensor f = cc.Encode(xn);
      const at::Tensor xhat = DecodeBatch(cc, f, options.sparse_decode_max_density);
      at::Tensor mask;
      if (C > 0) {
        mask = at::zeros({end - begin, C}, at::kFloat);
        float* mp = mask.data_ptr<float>();
        const at::Tensor seq = batch.sequence_ids.to(at::kLong).contiguous();
        const int64_t* sp = seq.data_ptr<int64_t>();
        for (int64_t r = 0; r < end - begin; ++r) {
          auto it = members.find(sp[r]);
          if (it == members.end()) continue;
          for (int32_t c : it->second) mp[r * C + c] = 1.0f;
        }
      }
      RETURN_IF_ERROR(acc.Add(xn, xhat, f, begin, mask));
      meter.Update(end);
    }
    meter.Finish(total);
    const LatentStatistics stats = acc.Finish();

    // Per-latent statistics and top examples.
    const at::Tensor count = stats.active_count.contiguous();
    const at::Tensor max_act = stats.max_act.to(at::kDouble).contiguous();
    const at::Tensor top_v = stats.top_values.to(at::kDouble).contiguous();
    const at::Tensor top_r = stats.top_rows.contiguous();
    const int64_t K = top_v.size(0);
    const auto count_a = count.accessor<int64_t, 1>();
    const auto max_a = max_act.accessor<double, 1>();
    const auto top_va = top_v.accessor<double, 2>();
    const auto top_ra = top_r.accessor<int64_t, 2>();
    for (int64_t j = 0; j < F; ++j) {
      LatentReport& l = report.latents[j];
      l.freq = stats.rows > 0 ? static_cast<double>(count_a[j]) / stats.rows : 0.0;
      l.max_act = max_a[j];
      for (int64_t k = 0; k < K; ++k) {
        const double v = top_va[k][j];
        const int64_t row = top_ra[k][j];
        if (!(v > 0) || row < 0) break;
        TopExample e;
        e.activation = v;
        e.row = row;
        const std::vector<TokenRow> window =
            tokens->Window(row, options.context_tokens, &e.context_index);
        const TokenRow& self = window[e.context_index];
        e.sequence_id = self.sequence_id;
        e.position = self.position;
        e.token_id = self.token_id;
        for (const TokenRow& t : window) e.context_token_ids.push_back(t.token_id);
        if (decoder.available()) {
          e.has_text = true;
          e.token_text = decoder.Decode({e.token_id});
          e.context_text = decoder.Decode(e.context_token_ids);
        }
        l.top_examples.push_back(std::move(e));
      }
    }

    // Latent scaling.
    const at::Tensor& sel = stats.scaling.latents;
    for (int64_t s = 0; s < sel.numel(); ++s) {
      LatentReport& l = report.latents[sel[s].item<int64_t>()];
      l.latent_scaling_computed = true;
      if (stats.scaling.sum_f2[s].item<double>() <= 0) continue;  // never fired
      l.nu_error = LatentStatisticsAccumulator::Nu(stats.scaling.beta_error, s);
      l.nu_reconstruction = LatentStatisticsAccumulator::Nu(stats.scaling.beta_reconstruction, s);
    }

    // Capability attribution.
    for (int64_t c = 0; c < C; ++c) {
      CapabilityReport cap;
      cap.category = categories[c].name;
      const double tokens_c = stats.category_tokens[c].item<double>();
      cap.tokens = static_cast<int64_t>(std::llround(tokens_c));
      const at::Tensor mass = stats.category_latent_mass[c].contiguous();
      const double* mp = mass.data_ptr<double>();
      double base = 0, ft = 0;
      std::vector<std::pair<double, int64_t>> ranked;
      for (int64_t j = 0; j < F; ++j) {
        const LatentTag tag = report.latents[j].tag;
        if (tag == LatentTag::kBaseOnly) base += mp[j];
        if (tag == LatentTag::kFinetuneOnly) ft += mp[j];
        if ((tag == LatentTag::kBaseOnly || tag == LatentTag::kFinetuneOnly) && mp[j] > 0) {
          ranked.emplace_back(mp[j], j);
        }
      }
      if (tokens_c > 0) {
        cap.base_mass = base / tokens_c;
        cap.finetune_mass = ft / tokens_c;
      }
      if (cap.base_mass > 0) {
        cap.change_percent = 100.0 * (cap.finetune_mass - cap.base_mass) / cap.base_mass;
      }
      std::stable_sort(ranked.begin(), ranked.end(),
                       [](const auto& a, const auto& b) { return a.first > b.first; });
      for (size_t i = 0; i < ranked.size() && i < 10; ++i) cap.latents.push_back(ranked[i].second);
      report.capabilities.push_back(std::move(cap));
    }

    ReportSummary& s = report.summary;
    s.models = manifest.models;
    s.layer = manifest.layer;
    s.rows = stats.rows;
    s.fvu = stats.fvu;
    s.l0 = stats.l0;
    s.dead_latents = (count == 0).sum().item<int64_t>();
    s.architecture = std::string(crosscoder::ArchitectureName(cc.architecture()));
    s.decoded_text = decoder.available();
    s.crosscoder_dir = options.crosscoder_dir;
    s.activations_dir = options.activations_dir;
    switch (options.latent_scaling) {
      case LatentScalingScope::kModelSpecific:
        s.latent_scaling_tags = {"finetune_only", "base_only"};
        break;
      case LatentScalingScope::kAll:
        s.latent_scaling_tags = {"finetune_only", "base_only", "shared", "other"};
        break;
      case LatentScalingScope::kNone:
        break;
    }
    SummarizeTags(report);
    if (!options.out_dir.empty()) RETURN_IF_ERROR(WriteReportFiles(report, options.out_dir));
    return report;
  });
}

}  // namespace crossdiff::analysis
