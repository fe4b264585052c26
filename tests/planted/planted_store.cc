#include "tests/planted/planted_store.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "core/activations/store.h"
#include "core/common/status_macros.h"
#include "core/common/torch_status.h"

namespace crossdiff::planted {

const char* GroupName(FeatureGroup g) {
  switch (g) {
    case FeatureGroup::kShared:
      return "shared";
    case FeatureGroup::kBaseOnly:
      return "base_only";
    case FeatureGroup::kFinetuneOnly:
      return "finetune_only";
  }
  return "?";
}

namespace {

at::Tensor UnitRows(const at::Tensor& t) { return t / t.norm(2, 1, /*keepdim=*/true); }

}  // namespace

absl::StatusOr<PlantedStore> WritePlantedStore(const std::string& dir, const PlantedOptions& o) {
  if (o.d_model < 2 || o.rows < 1 || o.num_shared < 0 || o.num_base_only < 0 ||
      o.num_finetune_only < 0 || o.num_shared + o.num_base_only + o.num_finetune_only < 1) {
    return absl::InvalidArgumentError("planted store: bad sizes");
  }
  return GuardTorch("planted store", [&]() -> absl::StatusOr<PlantedStore> {
    at::NoGradGuard no_grad;
    auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
    const int64_t S = o.num_shared, A = o.num_base_only, B = o.num_finetune_only;
    const int64_t N = S + A + B, D = o.d_model;
    PlantedStore out;
    out.dir = dir;

    // Dictionary.
    at::Tensor dict = at::zeros({2, N, D});
    at::Tensor shared_base = UnitRows(at::randn({S, D}, gen));
    at::Tensor other = at::randn({S, D}, gen);
    other = UnitRows(other - (other * shared_base).sum(1, true) * shared_base);  // orthogonal part
    const double c = o.shared_cosine;
    at::Tensor shared_ft = c * shared_base + std::sqrt(std::max(0.0, 1 - c * c)) * other;
    dict[0].slice(0, 0, S) = shared_base;
    dict[1].slice(0, 0, S) = shared_ft;
    dict[0].slice(0, S, S + A) = UnitRows(at::randn({A, D}, gen));
    dict[1].slice(0, S + A, N) = UnitRows(at::randn({B, D}, gen));
    out.dictionary = dict;
    for (int64_t i = 0; i < N; ++i) {
      out.groups.push_back(i < S       ? FeatureGroup::kShared
                           : i < S + A ? FeatureGroup::kBaseOnly
                                       : FeatureGroup::kFinetuneOnly);
    }

    // Frequencies: one log-uniform list, reused by every group (index within the group).
    const int64_t longest = std::max({S, A, B});
    std::vector<double> freq_list(longest);
    for (int64_t k = 0; k < longest; ++k) {
      const double t = longest > 1 ? static_cast<double>(k) / (longest - 1) : 0.5;
      freq_list[k] =
          std::exp(std::log(o.freq_min) + t * (std::log(o.freq_max) - std::log(o.freq_min)));
    }
    out.frequencies = at::zeros({N}, at::kDouble);
    for (int64_t i = 0; i < N; ++i) {
      const int64_t k = i < S ? i : i < S + A ? i - S : i - S - A;
      out.frequencies[i] = freq_list[k];
    }
    const at::Tensor p = out.frequencies.to(at::kFloat);

    activations::StoreWriter::Options wo;
    wo.models = o.models;
    wo.layer = 0;
    wo.d_model = D;
    wo.dtype = o.dtype;
    wo.rows_per_shard = o.rows_per_shard;
    wo.extra_json = "{\"generator\": \"planted\"}";
    ASSIGN_OR_RETURN(auto writer, activations::StoreWriter::Create(dir, wo));
    const int64_t chunk = 4096;
    for (int64_t begin = 0; begin < o.rows; begin += chunk) {
      const int64_t n = std::min(chunk, o.rows - begin);
      const at::Tensor on = at::rand({n, N}, gen) < p.unsqueeze(0);
      const at::Tensor mag =
          o.magnitude_min + (o.magnitude_max - o.magnitude_min) * at::rand({n, N}, gen);
      const at::Tensor a = on.to(at::kFloat) * mag;         // [n, N]
      at::Tensor x = at::einsum("bn,mnd->bmd", {a, dict});  // [n, 2, D]
      x = x + o.noise_std * at::randn({n, 2, D}, gen);
      auto [best, arg] = a.max(1);
      at::Tensor tokens = at::where(best > 0, arg + 1, at::zeros_like(arg)).to(at::kInt);
      at::Tensor rows = at::arange(begin, begin + n, at::kLong);
      activations::ActivationBatch batch;
      batch.activations = o.dtype == "bfloat16" ? x.to(at::kBFloat16) : x;
      batch.token_ids = tokens;
      batch.sequence_ids = rows.div(o.seq_len, "floor");
      batch.positions = rows.remainder(o.seq_len).to(at::kInt);
      RETURN_IF_ERROR(writer->Append(batch));
    }
    RETURN_IF_ERROR(writer->Finish().status());
    return out;
  });
}

std::vector<FeatureMatch> MatchFeatures(const PlantedStore& store,
                                        const at::Tensor& learned_decoder,
                                        const at::Tensor& scale) {
  at::NoGradGuard no_grad;
  const at::Tensor s = scale.to(at::kFloat).view({2, 1, 1});
  const at::Tensor truth =
      (store.dictionary * s).permute({1, 0, 2}).reshape({store.num_features(), -1});
  const int64_t F = learned_decoder.size(1);
  const at::Tensor learned = learned_decoder.to(at::kFloat).permute({1, 0, 2}).reshape({F, -1});
  const at::Tensor cos =
      UnitRows(truth).matmul(learned.div(learned.norm(2, 1, true).clamp_min(1e-12)).t());  // [N, F]
  auto [best, arg] = cos.max(1);
  std::vector<FeatureMatch> out;
  for (int64_t i = 0; i < store.num_features(); ++i) {
    out.push_back({i, arg[i].item<int64_t>(), best[i].item<double>()});
  }
  return out;
}

}  // namespace crossdiff::planted
