// Whether a base model and a fine-tune can be harvested as a pair: their residual streams must live
// in spaces of the same width and their inputs must mean the same thing. Checked from config.json
// and the tokenizer files alone, before any weight is loaded.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "core/models/model_config.h"
#include "core/tokenizer/tokenizer.h"

namespace crossdiff::harvest {

struct ModelPair {
  models::ModelConfig base;
  models::ModelConfig finetune;
  // The base's tokenizer (equal to the fine-tune's); null when neither directory has one.
  std::unique_ptr<tokenizer::Tokenizer> tokenizer;
  std::string tokenizer_fingerprint;  // empty without a tokenizer
};

// Loads both configs and tokenizers and compares them. INVALID_ARGUMENT naming both directories
// when d_model (hidden_size) or vocab_size differ, when the tokenizer fingerprints differ, or when
// only one directory has a tokenizer; also when `layer` is outside [0, num_layers) of either model.
// Errors of the config/tokenizer loaders pass through (NOT_FOUND, INVALID_ARGUMENT).
absl::StatusOr<ModelPair> LoadModelPair(const std::string& base_dir,
                                        const std::string& finetune_dir, int layer);

}  // namespace crossdiff::harvest
