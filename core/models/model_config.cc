#include "core/models/model_config.h"

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/common/status_macros.h"

namespace crossdiff::models {
namespace {

using Json = nlohmann::json;

// Typed access to config.json fields; every error names the file and the field.
class ConfigReader {
 public:
  ConfigReader(const Json& json, std::string source) : json_(json), source_(std::move(source)) {}

  bool Has(const std::string& key) const { return json_.contains(key) && !json_.at(key).is_null(); }

  absl::Status Error(const std::string& key, const std::string& problem) const {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": field '", key, "' ", problem));
  }

  absl::StatusOr<int64_t> Int(const std::string& key) const {
    if (!Has(key)) return Error(key, "is missing");
    const Json& v = json_.at(key);
    if (v.is_number_integer()) return v.get<int64_t>();
    if (v.is_number_float()) {
      double d = v.get<double>();
      if (d == std::floor(d)) return static_cast<int64_t>(d);
    }
    return Error(key, absl::StrCat("must be an integer, got ", v.dump()));
  }
  absl::StatusOr<int64_t> Int(const std::string& key, int64_t def) const {
    if (!Has(key)) return def;
    return Int(key);
  }
  absl::StatusOr<int64_t> PositiveInt(const std::string& key) const {
    ASSIGN_OR_RETURN(int64_t v, Int(key));
    if (v <= 0) return Error(key, absl::StrCat("must be positive, got ", v));
    return v;
  }
  absl::StatusOr<int64_t> PositiveInt(const std::string& key, int64_t def) const {
    if (!Has(key)) return def;
    return PositiveInt(key);
  }
  absl::StatusOr<double> Double(const std::string& key, double def) const {
    if (!Has(key)) return def;
    const Json& v = json_.at(key);
    if (!v.is_number()) return Error(key, absl::StrCat("must be a number, got ", v.dump()));
    return v.get<double>();
  }
  absl::StatusOr<bool> Bool(const std::string& key, bool def) const {
    if (!Has(key)) return def;
    const Json& v = json_.at(key);
    if (!v.is_boolean()) return Error(key, absl::StrCat("must be true or false, got ", v.dump()));
    return v.get<bool>();
  }
  absl::StatusOr<std::string> String(const std::string& key, const std::string& def) const {
    if (!Has(key)) return def;
    const Json& v = json_.at(key);
    if (!v.is_string()) return Error(key, absl::StrCat("must be a string, got ", v.dump()));
    return v.get<std::string>();
  }

  const Json& json() const { return json_; }
  const std::string& source() const { return source_; }

 private:
  const Json& json_;
  std::string source_;
};

absl::StatusOr<Activation> ParseActivation(const ConfigReader& r, const std::string& key,
                                           const std::string& name) {
  if (name == "silu" || name == "swish") return Activation::kSilu;
  if (name == "gelu") return Activation::kGeluErf;
  if (name == "gelu_new" || name == "gelu_pytorch_tanh" || name == "gelu_fast") {
    return Activation::kGeluTanh;
  }
  if (name == "relu") return Activation::kRelu;
  return r.Error(key, absl::StrCat("names unsupported activation '", name,
                                   "' (supported: silu, swish, gelu, gelu_new, gelu_pytorch_tanh, "
                                   "gelu_fast, relu)"));
}

absl::StatusOr<RopeScaling> ParseRopeScaling(const ConfigReader& r) {
  RopeScaling s;
  if (!r.Has("rope_scaling")) return s;
  const Json& j = r.json().at("rope_scaling");
  if (!j.is_object()) return r.Error("rope_scaling", "must be an object or null");
  ConfigReader sr(j, absl::StrCat(r.source(), ": rope_scaling"));
  std::string type = "default";
  if (sr.Has("rope_type")) {
    ASSIGN_OR_RETURN(type, sr.String("rope_type", "default"));
  } else if (sr.Has("type")) {
    ASSIGN_OR_RETURN(type, sr.String("type", "default"));
  }
  if (type == "default") return s;
  if (type != "linear" && type != "llama3") {
    return absl::UnimplementedError(
        absl::StrCat(r.source(), ": rope_scaling type '", type,
                     "' is not supported (supported: default, linear, llama3)"));
  }
  ASSIGN_OR_RETURN(s.factor, sr.Double("factor", 0.0));
  if (!sr.Has("factor") || !(s.factor > 0)) {
    return sr.Error("factor", "must be a positive number");
  }
  if (type == "linear") {
    s.type = RopeScaling::Type::kLinear;
    return s;
  }
  s.type = RopeScaling::Type::kLlama3;
  for (const char* key :
       {"low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}) {
    if (!sr.Has(key)) return sr.Error(key, "is missing (required by rope_type llama3)");
  }
  ASSIGN_OR_RETURN(s.low_freq_factor, sr.Double("low_freq_factor", 1.0));
  ASSIGN_OR_RETURN(s.high_freq_factor, sr.Double("high_freq_factor", 4.0));
  ASSIGN_OR_RETURN(s.original_max_position_embeddings,
                   sr.PositiveInt("original_max_position_embeddings"));
  if (!(s.high_freq_factor > s.low_freq_factor) || !(s.low_freq_factor > 0)) {
    return sr.Error("high_freq_factor", "must exceed low_freq_factor (both positive)");
  }
  return s;
}

absl::StatusOr<ModelConfig> ParseGpt2(const ConfigReader& r, ModelConfig c) {
  c.family = ModelFamily::kGpt2;
  ASSIGN_OR_RETURN(c.hidden_size, r.PositiveInt("n_embd", 768));
  ASSIGN_OR_RETURN(c.num_layers, r.PositiveInt("n_layer", 12));
  ASSIGN_OR_RETURN(c.num_heads, r.PositiveInt("n_head", 12));
  c.num_kv_heads = c.num_heads;
  if (c.hidden_size % c.num_heads != 0) {
    return r.Error("n_embd",
                   absl::StrCat(c.hidden_size, " is not divisible by n_head ", c.num_heads));
  }
  c.head_dim = c.hidden_size / c.num_heads;
  ASSIGN_OR_RETURN(c.intermediate_size, r.PositiveInt("n_inner", 4 * c.hidden_size));
  ASSIGN_OR_RETURN(c.vocab_size, r.PositiveInt("vocab_size", 50257));
  ASSIGN_OR_RETURN(c.max_position_embeddings, r.PositiveInt("n_positions", 1024));
  c.norm = NormKind::kLayerNorm;
  ASSIGN_OR_RETURN(c.norm_eps, r.Double("layer_norm_epsilon", 1e-5));
  ASSIGN_OR_RETURN(c.activation_name, r.String("activation_function", "gelu_new"));
  ASSIGN_OR_RETURN(c.activation, ParseActivation(r, "activation_function", c.activation_name));
  c.uses_rope = false;
  c.qkv_bias = c.o_bias = c.mlp_bias = true;
  c.gated_mlp = false;
  ASSIGN_OR_RETURN(c.tie_word_embeddings, r.Bool("tie_word_embeddings", true));
  ASSIGN_OR_RETURN(bool scale_weights, r.Bool("scale_attn_weights", true));
  c.attention_scale = scale_weights ? 1.0 / std::sqrt(static_cast<double>(c.head_dim)) : 1.0;
  ASSIGN_OR_RETURN(c.scale_attn_by_inverse_layer_idx,
                   r.Bool("scale_attn_by_inverse_layer_idx", false));
  c.layer_sliding_window.assign(c.num_layers, 0);
  return c;
}

// Llama, Mistral, Qwen2, Gemma, Gemma-2: the shared "Llama-shaped" decoder.
absl::StatusOr<ModelConfig> ParseLlamaLike(const ConfigReader& r, ModelConfig c) {
  const std::string& t = c.model_type;
  ASSIGN_OR_RETURN(c.hidden_size, r.PositiveInt("hidden_size"));
  ASSIGN_OR_RETURN(c.num_layers, r.PositiveInt("num_hidden_layers"));
  ASSIGN_OR_RETURN(c.num_heads, r.PositiveInt("num_attention_heads"));
  ASSIGN_OR_RETURN(c.num_kv_heads, r.PositiveInt("num_key_value_heads", c.num_heads));
  if (c.num_heads % c.num_kv_heads != 0) {
    return r.Error(
        "num_key_value_heads",
        absl::StrCat(c.num_kv_heads, " does not divide num_attention_heads ", c.num_heads));
  }
  // Qwen2 in transformers 4.45 ignores a head_dim key; the others honour it.
  if (t != "qwen2" && r.Has("head_dim")) {
    ASSIGN_OR_RETURN(c.head_dim, r.PositiveInt("head_dim"));
  } else {
    if (c.hidden_size % c.num_heads != 0) {
      return r.Error(
          "hidden_size",
          absl::StrCat(c.hidden_size, " is not divisible by num_attention_heads ", c.num_heads));
    }
    c.head_dim = c.hidden_size / c.num_heads;
  }
  if (c.head_dim % 2 != 0) return r.Error("head_dim", "must be even for rotary embeddings");
  ASSIGN_OR_RETURN(c.intermediate_size, r.PositiveInt("intermediate_size"));
  ASSIGN_OR_RETURN(c.vocab_size, r.PositiveInt("vocab_size"));
  ASSIGN_OR_RETURN(c.max_position_embeddings, r.PositiveInt("max_position_embeddings", 2048));
  ASSIGN_OR_RETURN(c.norm_eps, r.Double("rms_norm_eps", 1e-6));
  ASSIGN_OR_RETURN(c.rope_theta, r.Double("rope_theta", 10000.0));
  if (!(c.rope_theta > 0)) return r.Error("rope_theta", "must be positive");
  ASSIGN_OR_RETURN(c.rope_scaling, ParseRopeScaling(r));
  c.uses_rope = true;
  c.gated_mlp = true;
  c.attention_scale = 1.0 / std::sqrt(static_cast<double>(c.head_dim));
  c.layer_sliding_window.assign(c.num_layers, 0);

  const bool gemma = (t == "gemma" || t == "gemma2");
  c.norm = gemma ? NormKind::kRmsNormUnitOffset : NormKind::kRmsNorm;
  c.scale_embeddings = gemma;
  ASSIGN_OR_RETURN(c.tie_word_embeddings, r.Bool("tie_word_embeddings", gemma));

  // Activation. Gemma/Gemma-2 read `hidden_activation`; when it is absent, transformers 4.45
  // ignores `hidden_act` (real Gemma-1 checkpoints say "gelu") and uses tanh-GELU.
  if (gemma) {
    ASSIGN_OR_RETURN(c.activation_name, r.String("hidden_activation", "gelu_pytorch_tanh"));
    ASSIGN_OR_RETURN(c.activation, ParseActivation(r, "hidden_activation", c.activation_name));
  } else {
    ASSIGN_OR_RETURN(c.activation_name, r.String("hidden_act", "silu"));
    ASSIGN_OR_RETURN(c.activation, ParseActivation(r, "hidden_act", c.activation_name));
  }

  if (t == "llama") {
    c.family = ModelFamily::kLlama;
    ASSIGN_OR_RETURN(bool attn_bias, r.Bool("attention_bias", false));
    c.qkv_bias = c.o_bias = attn_bias;
    ASSIGN_OR_RETURN(c.mlp_bias, r.Bool("mlp_bias", false));
  } else if (t == "mistral") {
    c.family = ModelFamily::kMistral;
    if (r.Has("sliding_window")) {
      ASSIGN_OR_RETURN(int64_t window, r.PositiveInt("sliding_window"));
      c.layer_sliding_window.assign(c.num_layers, window);
    }
  } else if (t == "qwen2") {
    c.family = ModelFamily::kQwen2;
    c.qkv_bias = true;
    ASSIGN_OR_RETURN(bool use_window, r.Bool("use_sliding_window", false));
    if (use_window) {
      // transformers 4.45 applies Qwen2's window only inside flash attention, not in the eager
      // reference we match, so the numbers would be ambiguous.
      return absl::UnimplementedError(
          absl::StrCat(r.source(), ": qwen2 with use_sliding_window=true is not supported"));
    }
  } else if (t == "gemma") {
    c.family = ModelFamily::kGemma;
    ASSIGN_OR_RETURN(bool attn_bias, r.Bool("attention_bias", false));
    c.qkv_bias = c.o_bias = attn_bias;
  } else {  // gemma2
    c.family = ModelFamily::kGemma2;
    ASSIGN_OR_RETURN(bool attn_bias, r.Bool("attention_bias", false));
    c.qkv_bias = c.o_bias = attn_bias;
    c.sandwich_norms = true;
    ASSIGN_OR_RETURN(double scalar, r.Double("query_pre_attn_scalar", 256.0));
    if (!(scalar > 0)) return r.Error("query_pre_attn_scalar", "must be positive");
    c.attention_scale = 1.0 / std::sqrt(scalar);
    // Soft-caps: an explicit null turns them off; an absent key means the class default.
    auto cap = [&](const std::string& key, double def) -> absl::StatusOr<double> {
      if (r.json().contains(key) && r.json().at(key).is_null()) return 0.0;
      ASSIGN_OR_RETURN(double v, r.Double(key, def));
      if (v < 0) return r.Error(key, "must not be negative");
      return v;
    };
    ASSIGN_OR_RETURN(c.attn_logit_softcapping, cap("attn_logit_softcapping", 50.0));
    ASSIGN_OR_RETURN(c.final_logit_softcapping, cap("final_logit_softcapping", 30.0));
    ASSIGN_OR_RETURN(int64_t window, r.PositiveInt("sliding_window", 4096));
    // Layers with an even index are local (sliding), odd ones global.
    for (int64_t i = 0; i < c.num_layers; i += 2) c.layer_sliding_window[i] = window;
  }
  return c;
}

}  // namespace

std::vector<std::string> SupportedModelTypes() {
  return {"gemma", "gemma2", "gpt2", "llama", "mistral", "qwen2"};
}

absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text,
                                             const std::string& source) {
  Json json = Json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded()) {
    // Re-parse with exceptions for the position of the error.
    std::string detail = "malformed JSON";
    try {
      Json ignored = Json::parse(json_text);
      (void)ignored;
    } catch (const Json::parse_error& e) {
      detail = absl::StrCat("malformed JSON at byte ", e.byte);
    }
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", detail));
  }
  if (!json.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": expected a JSON object"));
  }
  ConfigReader r(json, source);
  ModelConfig c;
  if (!r.Has("model_type")) return r.Error("model_type", "is missing");
  ASSIGN_OR_RETURN(c.model_type, r.String("model_type", ""));
  const auto supported = SupportedModelTypes();
  if (std::find(supported.begin(), supported.end(), c.model_type) == supported.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": unsupported model_type '", c.model_type,
                     "' (supported: ", absl::StrJoin(supported, ", "), ")"));
  }
  if (c.model_type == "gpt2") return ParseGpt2(r, std::move(c));
  return ParseLlamaLike(r, std::move(c));
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir) {
  const std::string path = model_dir + "/config.json";
  std::ifstream in(path, std::ios::binary);
  if (!in)
    return absl::NotFoundError(absl::StrCat(path, ": cannot open (no config.json in model dir)"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ParseModelConfig(ss.str(), path);
}

}  // namespace crossdiff::models
