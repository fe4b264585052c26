#include "core/crosscoder/crosscoder.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "core/common/status_macros.h"
#include "core/common/torch_status.h"
#include "core/tensor_io/safetensors.h"
#include "core/tensor_io/torch_tensors.h"

namespace crossdiff::crosscoder {
namespace {

using nlohmann::json;

constexpr char kWeightsFile[] = "crosscoder.safetensors";
constexpr char kConfigFile[] = "config.json";

absl::Status WriteFileAtomically(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return absl::PermissionDeniedError(absl::StrCat(tmp, ": cannot open for writing"));
    out << text;
    out.flush();
    if (!out) return absl::DataLossError(absl::StrCat(tmp, ": write failed"));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) return absl::InternalError(absl::StrCat(path, ": rename failed: ", ec.message()));
  return absl::OkStatus();
}

absl::Status CheckShape(const std::string& file, const std::string& name, const at::Tensor& t,
                        std::vector<int64_t> expected) {
  if (t.scalar_type() != at::kFloat) {
    return absl::InvalidArgumentError(absl::StrCat(
        file, ": tensor '", name, "' must be F32, found ", c10::toString(t.scalar_type())));
  }
  if (t.sizes().vec() != expected) {
    std::ostringstream want, got;
    want << at::IntArrayRef(expected);
    got << t.sizes();
    return absl::InvalidArgumentError(absl::StrCat(
        file, ": tensor '", name, "' has shape ", got.str(), ", config.json implies ", want.str()));
  }
  return absl::OkStatus();
}

}  // namespace

std::string_view ArchitectureName(Architecture arch) {
  return arch == Architecture::kBatchTopK ? "batch_top_k" : "relu_l1";
}

absl::StatusOr<Architecture> ParseArchitecture(std::string_view name) {
  if (name == "batch_top_k" || name == "batch-topk" || name == "batch-top-k" ||
      name == "batchtopk") {
    return Architecture::kBatchTopK;
  }
  if (name == "relu_l1" || name == "relu-l1") return Architecture::kReluL1;
  return absl::InvalidArgumentError(absl::StrCat("architecture '", std::string(name),
                                                 "' is unknown (expected batch-topk or relu-l1)"));
}

absl::Status CrosscoderConfig::Validate() const {
  if (activation_dim <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("activation_dim must be positive, got ", activation_dim));
  }
  if (dict_size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("dict_size must be positive, got ", dict_size));
  }
  if (num_models < 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "num_models must be at least 2 (a crosscoder compares models), got ", num_models));
  }
  if (architecture == Architecture::kBatchTopK && (k < 1 || k > dict_size)) {
    return absl::InvalidArgumentError(
        absl::StrCat("k must be in [1, dict_size=", dict_size, "], got ", k));
  }
  if (!models.empty() && static_cast<int64_t>(models.size()) != num_models) {
    return absl::InvalidArgumentError(
        absl::StrCat("models has ", models.size(), " names but num_models is ", num_models));
  }
  return absl::OkStatus();
}

absl::Status CrosscoderConfig::CheckCompatible(const CrosscoderConfig& o,
                                               std::string_view what) const {
  auto differ = [&](std::string_view field, const std::string& mine, const std::string& theirs) {
    return absl::FailedPreconditionError(absl::StrCat(std::string(what), ": ", std::string(field),
                                                      " is ", theirs, " but this run has ", mine));
  };
  if (architecture != o.architecture) {
    return differ("architecture", std::string(ArchitectureName(architecture)),
                  std::string(ArchitectureName(o.architecture)));
  }
  if (activation_dim != o.activation_dim) {
    return differ("activation_dim", absl::StrCat(activation_dim), absl::StrCat(o.activation_dim));
  }
  if (dict_size != o.dict_size)
    return differ("dict_size", absl::StrCat(dict_size), absl::StrCat(o.dict_size));
  if (num_models != o.num_models) {
    return differ("num_models", absl::StrCat(num_models), absl::StrCat(o.num_models));
  }
  if (architecture == Architecture::kBatchTopK && k != o.k) {
    return differ("k", absl::StrCat(k), absl::StrCat(o.k));
  }
  return absl::OkStatus();
}

absl::StatusOr<Crosscoder> Crosscoder::Create(const CrosscoderConfig& config) {
  RETURN_IF_ERROR(config.Validate());
  Crosscoder c;
  c.config_ = config;
  const int64_t M = config.num_models, d = config.activation_dim, F = config.dict_size;
  auto opts = at::TensorOptions().dtype(at::kFloat);
  c.enc_ = at::zeros({F, M * d}, opts);
  c.b_enc_ = at::zeros({F}, opts);
  c.dec_ = at::zeros({F, M * d}, opts);
  c.b_dec_ = at::zeros({M, d}, opts);
  c.activation_scale_ = at::ones({M}, opts);
  return c;
}

void Crosscoder::InitializeWeights(uint64_t seed, double decoder_init_norm) {
  const int64_t M = this->M(), d = this->d(), F = this->F();
  at::Generator gen = at::detail::createCPUGenerator(seed);
  // One random direction per latent, shared by every model's block (the same encoder for every
  // model), each block of norm decoder_init_norm.
  at::Tensor dir = at::randn({F, 1, d}, gen, at::TensorOptions().dtype(at::kFloat));
  dir = dir / dir.norm(2, {2}, true).clamp_min(1e-12) * decoder_init_norm;
  dec_.view({F, M, d}).copy_(dir.expand({F, M, d}));
  enc_.copy_(dec_);
  b_enc_.zero_();
  b_dec_.zero_();
}

at::Tensor Crosscoder::W_enc() const { return enc_.view({F(), M(), d()}).permute({1, 2, 0}); }

at::Tensor Crosscoder::FlattenParameters() {
  if (flat_.defined()) return flat_;
  const int64_t fmd = F() * M() * d(), md = M() * d();
  at::Tensor flat = at::empty({2 * fmd + F() + md}, at::TensorOptions().dtype(at::kFloat));
  flat.narrow(0, 0, fmd).view({F(), md}).copy_(enc_);
  flat.narrow(0, fmd, fmd).view({F(), md}).copy_(dec_);
  flat.narrow(0, 2 * fmd, F()).copy_(b_enc_);
  flat.narrow(0, 2 * fmd + F(), md).view({M(), d()}).copy_(b_dec_);
  enc_ = flat.narrow(0, 0, fmd).view({F(), md});
  dec_ = flat.narrow(0, fmd, fmd).view({F(), md});
  b_enc_ = flat.narrow(0, 2 * fmd, F());
  b_dec_ = flat.narrow(0, 2 * fmd + F(), md).view({M(), d()});
  flat_ = flat;
  return flat_;
}

at::Tensor Crosscoder::W_dec() const { return dec_.view({F(), M(), d()}).permute({1, 0, 2}); }

absl::Status Crosscoder::SetNormalization(at::Tensor mean, at::Tensor scale) {
  if (!scale.defined() || scale.dim() != 1 || scale.size(0) != M()) {
    return absl::InvalidArgumentError(absl::StrCat("activation_scale must have shape [", M(), "]"));
  }
  scale = scale.to(at::kFloat).contiguous();
  if (!at::isfinite(scale).all().item<bool>() || (scale <= 0).any().item<bool>()) {
    return absl::InvalidArgumentError("activation_scale must be finite and positive");
  }
  if (mean.defined()) {
    if (mean.dim() != 2 || mean.size(0) != M() || mean.size(1) != d()) {
      return absl::InvalidArgumentError(
          absl::StrCat("activation_mean must have shape [", M(), ", ", d(), "]"));
    }
    mean = mean.to(at::kFloat).contiguous();
    if (!at::isfinite(mean).all().item<bool>()) {
      return absl::InvalidArgumentError("activation_mean must be finite");
    }
  }
  activation_mean_ = mean;
  activation_scale_ = scale;
  return absl::OkStatus();
}

at::Tensor Crosscoder::Normalize(const at::Tensor& x) const {
  at::Tensor xn = x.to(at::kFloat);
  if (activation_mean_.defined()) xn = xn - activation_mean_.unsqueeze(0);
  return xn * activation_scale_.view({1, M(), 1});
}

at::Tensor Crosscoder::Denormalize(const at::Tensor& xn) const {
  at::Tensor x = xn / activation_scale_.view({1, M(), 1});
  if (activation_mean_.defined()) x = x + activation_mean_.unsqueeze(0);
  return x;
}

at::Tensor Crosscoder::EncodePre(const at::Tensor& xn) const {
  const int64_t B = xn.size(0);
  return at::addmm(b_enc_, xn.reshape({B, M() * d()}).to(at::kFloat), enc_.t());
}

at::Tensor Crosscoder::Encode(const at::Tensor& xn) const {
  at::Tensor act = at::relu(EncodePre(xn));
  if (architecture() == Architecture::kReluL1) return act;
  at::Tensor scores = act * LatentWeights().unsqueeze(0);
  if (threshold_ >= 0) return act * (scores > threshold_).to(at::kFloat);
  return act * BatchTopKMask(scores, config_.k * xn.size(0));
}

at::Tensor Crosscoder::Decode(const at::Tensor& f) const {
  const int64_t B = f.size(0);
  return at::addmm(b_dec_.reshape({1, M() * d()}), f.to(at::kFloat), dec_).view({B, M(), d()});
}

at::Tensor Crosscoder::DecoderNorms() const {
  return dec_.view({F(), M(), d()}).norm(2, {2}).t().contiguous();
}

at::Tensor Crosscoder::LatentWeights() const {
  return dec_.view({F(), M(), d()}).norm(2, {2}).sum(1);
}

void Crosscoder::CopyFrom(const Crosscoder& o) {
  config_ = o.config_;
  enc_.copy_(o.enc_);
  b_enc_.copy_(o.b_enc_);
  dec_.copy_(o.dec_);
  b_dec_.copy_(o.b_dec_);
  activation_mean_ = o.activation_mean_.defined() ? o.activation_mean_.clone() : at::Tensor();
  activation_scale_ = o.activation_scale_.clone();
  threshold_ = o.threshold_;
}

Crosscoder Crosscoder::Clone() const {
  Crosscoder c;
  c.config_ = config_;
  c.enc_ = enc_.clone();
  c.b_enc_ = b_enc_.clone();
  c.dec_ = dec_.clone();
  // (the clone owns separate tensors; flatten again if a flat buffer is needed)
  c.b_dec_ = b_dec_.clone();
  c.activation_mean_ = activation_mean_.defined() ? activation_mean_.clone() : at::Tensor();
  c.activation_scale_ = activation_scale_.clone();
  c.threshold_ = threshold_;
  return c;
}

absl::Status Crosscoder::Save(const std::string& dir) const {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec)
    return absl::PermissionDeniedError(
        absl::StrCat(dir, ": cannot create directory: ", ec.message()));
  return GuardTorch(absl::StrCat("saving crosscoder to ", dir), [&]() -> absl::Status {
    tensor_io::SafetensorsWriter writer;
    RETURN_IF_ERROR(tensor_io::AddTensor(writer, "encoder.weight", W_enc().contiguous()));
    RETURN_IF_ERROR(tensor_io::AddTensor(writer, "encoder.bias", b_enc_));
    RETURN_IF_ERROR(tensor_io::AddTensor(writer, "decoder.weight", W_dec().contiguous()));
    RETURN_IF_ERROR(tensor_io::AddTensor(writer, "decoder.bias", b_dec_));
    RETURN_IF_ERROR(tensor_io::AddTensor(writer, "activation_scale", activation_scale_));
    if (activation_mean_.defined()) {
      RETURN_IF_ERROR(tensor_io::AddTensor(writer, "activation_mean", activation_mean_));
    }
    if (architecture() == Architecture::kBatchTopK) {
      RETURN_IF_ERROR(tensor_io::AddTensor(
          writer, "threshold",
          at::scalar_tensor(threshold_, at::TensorOptions().dtype(at::kFloat))));
    }
    writer.SetMetadata("format", "crossdiff.crosscoder");
    RETURN_IF_ERROR(writer.Write(dir + "/" + kWeightsFile));

    json cfg = json::object();
    json extra =
        json::parse(config_.extra_json.empty() ? "{}" : config_.extra_json, nullptr, false);
    if (extra.is_object()) cfg = extra;
    cfg["architecture"] = std::string(ArchitectureName(architecture()));
    cfg["activation_dim"] = d();
    cfg["dict_size"] = F();
    cfg["num_models"] = M();
    cfg["k"] = config_.k;
    cfg["models"] = config_.models;
    cfg["layer"] = config_.layer;
    cfg["normalized"] = true;
    cfg["centered"] = activation_mean_.defined();
    cfg["threshold"] = threshold_;
    cfg["format"] = "crossdiff.crosscoder";
    cfg["version"] = 1;
    return WriteFileAtomically(dir + "/" + kConfigFile, cfg.dump(2) + "\n");
  });
}

absl::StatusOr<CrosscoderConfig> LoadCrosscoderConfig(const std::string& dir) {
  const std::string path = dir + "/" + kConfigFile;
  std::ifstream in(path);
  if (!in)
    return absl::NotFoundError(absl::StrCat(path, ": cannot open (not a crosscoder directory?)"));
  std::stringstream ss;
  ss << in.rdbuf();
  json j = json::parse(ss.str(), nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  }
  CrosscoderConfig c;
  auto get_int = [&](const char* field, bool required, int64_t def) -> absl::StatusOr<int64_t> {
    if (!j.contains(field) || j[field].is_null()) {
      if (required)
        return absl::InvalidArgumentError(absl::StrCat(path, ": missing field '", field, "'"));
      return def;
    }
    if (!j[field].is_number_integer()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": field '", field, "' must be an integer"));
    }
    return j[field].get<int64_t>();
  };
  if (!j.contains("architecture") || !j["architecture"].is_string()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": missing string field 'architecture'"));
  }
  auto arch = ParseArchitecture(j["architecture"].get<std::string>());
  if (!arch.ok())
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", arch.status().message()));
  c.architecture = *arch;
  ASSIGN_OR_RETURN(c.activation_dim, get_int("activation_dim", true, 0));
  ASSIGN_OR_RETURN(c.dict_size, get_int("dict_size", true, 0));
  ASSIGN_OR_RETURN(c.num_models, get_int("num_models", false, 2));
  ASSIGN_OR_RETURN(c.k, get_int("k", c.architecture == Architecture::kBatchTopK, 0));
  ASSIGN_OR_RETURN(int64_t layer, get_int("layer", false, 0));
  c.layer = static_cast<int>(layer);
  if (j.contains("models") && j["models"].is_array()) {
    for (const auto& m : j["models"]) {
      if (!m.is_string())
        return absl::InvalidArgumentError(absl::StrCat(path, ": 'models' must hold strings"));
      c.models.push_back(m.get<std::string>());
    }
  }
  json extra = j;
  for (const char* f :
       {"architecture", "activation_dim", "dict_size", "num_models", "k", "models", "layer"}) {
    extra.erase(f);
  }
  c.extra_json = extra.dump();
  absl::Status v = c.Validate();
  if (!v.ok()) return absl::InvalidArgumentError(absl::StrCat(path, ": ", v.message()));
  return c;
}

absl::StatusOr<Crosscoder> Crosscoder::Load(const std::string& dir) {
  ASSIGN_OR_RETURN(CrosscoderConfig config, LoadCrosscoderConfig(dir));
  const std::string path = dir + "/" + kWeightsFile;
  ASSIGN_OR_RETURN(auto file, tensor_io::SafetensorsFile::Open(path));
  ASSIGN_OR_RETURN(Crosscoder c, Create(config));
  const int64_t M = config.num_models, d = config.activation_dim, F = config.dict_size;
  return GuardTorch(absl::StrCat("loading ", path), [&]() -> absl::StatusOr<Crosscoder> {
    ASSIGN_OR_RETURN(at::Tensor we, tensor_io::LoadTensor(*file, "encoder.weight"));
    RETURN_IF_ERROR(CheckShape(path, "encoder.weight", we, {M, d, F}));
    ASSIGN_OR_RETURN(at::Tensor be, tensor_io::LoadTensor(*file, "encoder.bias"));
    RETURN_IF_ERROR(CheckShape(path, "encoder.bias", be, {F}));
    ASSIGN_OR_RETURN(at::Tensor wd, tensor_io::LoadTensor(*file, "decoder.weight"));
    RETURN_IF_ERROR(CheckShape(path, "decoder.weight", wd, {M, F, d}));
    ASSIGN_OR_RETURN(at::Tensor bd, tensor_io::LoadTensor(*file, "decoder.bias"));
    RETURN_IF_ERROR(CheckShape(path, "decoder.bias", bd, {M, d}));
    ASSIGN_OR_RETURN(at::Tensor scale, tensor_io::LoadTensor(*file, "activation_scale"));
    RETURN_IF_ERROR(CheckShape(path, "activation_scale", scale, {M}));
    at::Tensor mean;
    if (file->Find("activation_mean") != nullptr) {
      ASSIGN_OR_RETURN(mean, tensor_io::LoadTensor(*file, "activation_mean"));
      RETURN_IF_ERROR(CheckShape(path, "activation_mean", mean, {M, d}));
    }
    if (file->Find("threshold") != nullptr) {
      ASSIGN_OR_RETURN(at::Tensor t, tensor_io::LoadTensor(*file, "threshold"));
      if (t.numel() != 1 || t.scalar_type() != at::kFloat) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": tensor 'threshold' must be one F32 value"));
      }
      c.threshold_ = t.item<float>();
    }
    c.enc_.view({F, M, d}).copy_(we.permute({2, 0, 1}));
    c.b_enc_.copy_(be);
    c.dec_.view({F, M, d}).copy_(wd.permute({1, 0, 2}));
    c.b_dec_.copy_(bd);
    absl::Status s = c.SetNormalization(mean, scale);
    if (!s.ok()) return absl::InvalidArgumentError(absl::StrCat(path, ": ", s.message()));
    return c;
  });
}

at::Tensor BatchTopKMask(const at::Tensor& scores, int64_t k_times_b) {
  at::Tensor flat = scores.reshape({-1});
  const int64_t n = std::min<int64_t>(k_times_b, flat.numel());
  at::Tensor mask = at::zeros_like(flat);
  if (n <= 0) return mask.view_as(scores);
  auto top = at::topk(flat, n, 0, /*largest=*/true, /*sorted=*/false);
  at::Tensor values = std::get<0>(top), idx = std::get<1>(top);
  mask.index_put_({idx}, (values > 0).to(at::kFloat));
  return mask.view_as(scores);
}

}  // namespace crossdiff::crosscoder
