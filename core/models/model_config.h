// The numbers-relevant subset of a Hugging Face `config.json`, normalised across the supported
// families (GPT-2, Llama, Mistral, Qwen2, Gemma, Gemma-2).
//
// Every field that changes the forward pass is resolved here, with the per-family defaults of
// transformers 4.45 applied when a key is absent (e.g. `tie_word_embeddings`: true for gpt2, gemma,
// gemma2; false for llama, mistral, qwen2). The forward code never looks at raw JSON.
//
// Errors: NOT_FOUND when config.json is missing; INVALID_ARGUMENT naming the file and field when
// the JSON is malformed, a required field is missing or has the wrong type, or `model_type` is
// unknown (the message lists the supported ones); UNIMPLEMENTED for a recognised but unsupported
// option (e.g. rope_scaling type "yarn"). Plain values, thread-compatible.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace crossdiff::models {

enum class ModelFamily { kGpt2, kLlama, kMistral, kQwen2, kGemma, kGemma2 };

enum class Activation {
  kSilu,      // silu / swish
  kGeluErf,   // gelu (exact)
  kGeluTanh,  // gelu_new / gelu_pytorch_tanh / gelu_fast (and Gemma-1's "gelu", as HF 4.45 does)
  kRelu,
};

enum class NormKind {
  kLayerNorm,         // (x - mean) / sqrt(var + eps) * w + b            (GPT-2)
  kRmsNorm,           // x / sqrt(mean(x^2) + eps) * w                    (Llama, Mistral, Qwen2)
  kRmsNormUnitOffset  // x / sqrt(mean(x^2) + eps) * (1 + w)              (Gemma, Gemma-2)
};

// rope_scaling (`rope_type` or legacy `type` key). kDefault also covers a null/absent rope_scaling.
struct RopeScaling {
  enum class Type { kDefault, kLinear, kLlama3 };
  Type type = Type::kDefault;
  double factor = 1.0;
  // llama3 only.
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

struct ModelConfig {
  std::string
      model_type;  // as in config.json: "gpt2", "llama", "mistral", "qwen2", "gemma", "gemma2"
  ModelFamily family = ModelFamily::kLlama;

  int64_t hidden_size = 0;  // d_model
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;  // == num_heads for MHA, 1 for MQA
  int64_t head_dim = 0;      // config `head_dim` when present, else hidden_size / num_heads
  int64_t intermediate_size = 0;
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 0;  // GPT-2: n_positions (hard limit of the wpe table)

  NormKind norm = NormKind::kRmsNorm;
  double norm_eps = 1e-6;
  Activation activation = Activation::kSilu;
  std::string activation_name;  // as written in the config, for messages

  // Rotary embeddings (not GPT-2, which has learned absolute positions).
  bool uses_rope = true;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;

  bool qkv_bias = false;  // Llama/Gemma attention_bias; always true for Qwen2 and GPT-2
  bool o_bias = false;    // Llama/Gemma attention_bias; GPT-2 true; Qwen2 false
  bool mlp_bias = false;  // Llama mlp_bias; GPT-2 true
  bool gated_mlp = true;  // down(act(gate(x)) * up(x)); GPT-2: proj(act(fc(x)))
  bool tie_word_embeddings = false;

  // Gemma/Gemma-2: embeddings * sqrt(hidden_size), the factor rounded to the activation dtype.
  bool scale_embeddings = false;
  // Attention score scale (applied to q.k): 1/sqrt(head_dim), or query_pre_attn_scalar^-0.5
  // (Gemma-2). GPT-2's scale_attn_by_inverse_layer_idx additionally divides by (layer + 1).
  double attention_scale = 1.0;
  bool scale_attn_by_inverse_layer_idx = false;
  // Soft-capping: x -> tanh(x / cap) * cap; 0 = off.
  double attn_logit_softcapping = 0.0;
  double final_logit_softcapping = 0.0;
  // Gemma-2 sandwich norms: post_attention_layernorm on the attention output,
  // pre_/post_feedforward_layernorm around the MLP.
  bool sandwich_norms = false;

  // Sliding-window attention: query i sees key j iff i - window < j <= i. Per layer; 0 = global.
  // Mistral: every layer (when sliding_window is not null); Gemma-2: even layers.
  std::vector<int64_t> layer_sliding_window;

  // Helpers.
  int64_t SlidingWindow(int64_t layer) const {
    return layer >= 0 && layer < static_cast<int64_t>(layer_sliding_window.size())
               ? layer_sliding_window[layer]
               : 0;
  }
};

// The model_type values accepted by LoadModelConfig / ParseModelConfig.
std::vector<std::string> SupportedModelTypes();

// Reads `model_dir/config.json`.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir);
// Parses config.json text; `source` names it in errors.
absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text,
                                             const std::string& source);

}  // namespace crossdiff::models
