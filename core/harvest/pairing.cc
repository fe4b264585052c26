#include "core/harvest/pairing.h"

#include "absl/strings/str_cat.h"
#include "core/common/status_macros.h"

namespace crossdiff::harvest {
namespace {

absl::Status Unpairable(const std::string& base_dir, const std::string& finetune_dir,
                        const std::string& why) {
  return absl::InvalidArgumentError(
      absl::StrCat("cannot pair base ", base_dir, " with fine-tune ", finetune_dir, ": ", why));
}

// The tokenizer of a directory, or null when it has none (NOT_FOUND from the loader).
absl::StatusOr<std::unique_ptr<tokenizer::Tokenizer>> MaybeLoadTokenizer(const std::string& dir) {
  auto tok = tokenizer::Tokenizer::Load(dir);
  if (tok.ok()) return std::move(*tok);
  if (tok.status().code() == absl::StatusCode::kNotFound) {
    return std::unique_ptr<tokenizer::Tokenizer>();
  }
  return tok.status();
}

}  // namespace

absl::StatusOr<ModelPair> LoadModelPair(const std::string& base_dir,
                                        const std::string& finetune_dir, int layer) {
  ModelPair pair;
  ASSIGN_OR_RETURN(pair.base, models::LoadModelConfig(base_dir));
  ASSIGN_OR_RETURN(pair.finetune, models::LoadModelConfig(finetune_dir));
  if (pair.base.hidden_size != pair.finetune.hidden_size) {
    return Unpairable(base_dir, finetune_dir,
                      absl::StrCat("d_model differs (", pair.base.hidden_size, " vs ",
                                   pair.finetune.hidden_size, ")"));
  }
  if (pair.base.vocab_size != pair.finetune.vocab_size) {
    return Unpairable(base_dir, finetune_dir,
                      absl::StrCat("vocabulary size differs (", pair.base.vocab_size, " vs ",
                                   pair.finetune.vocab_size, ")"));
  }
  for (const auto* side : {&pair.base, &pair.finetune}) {
    const std::string& dir = side == &pair.base ? base_dir : finetune_dir;
    if (layer < 0 || layer >= side->num_layers) {
      return absl::InvalidArgumentError(
          absl::StrCat("layer ", layer, " is out of range: ", dir, " has ", side->num_layers,
                       " blocks (layers 0..", side->num_layers - 1, ")"));
    }
  }
  ASSIGN_OR_RETURN(pair.tokenizer, MaybeLoadTokenizer(base_dir));
  ASSIGN_OR_RETURN(auto finetune_tokenizer, MaybeLoadTokenizer(finetune_dir));
  if ((pair.tokenizer == nullptr) != (finetune_tokenizer == nullptr)) {
    return Unpairable(base_dir, finetune_dir,
                      absl::StrCat("only ", pair.tokenizer ? base_dir : finetune_dir,
                                   " has a tokenizer (tokenizer.json / tokenizer.model)"));
  }
  if (pair.tokenizer != nullptr) {
    pair.tokenizer_fingerprint = pair.tokenizer->Fingerprint();
    const std::string other = finetune_tokenizer->Fingerprint();
    if (pair.tokenizer_fingerprint != other) {
      return Unpairable(
          base_dir, finetune_dir,
          absl::StrCat("tokenizers differ (fingerprints ", pair.tokenizer_fingerprint.substr(0, 12),
                       " vs ", other.substr(0, 12), ")"));
    }
  }
  return pair;
}

}  // namespace crossdiff::harvest
