#include "core/tokenizer/tokenizer.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "core/common/status_macros.h"
#include "core/tokenizer/bpe_tokenizer.h"
#include "core/tokenizer/sentencepiece_tokenizer.h"
#include "core/tokenizer/tokenizer_config.h"

namespace crossdiff::tokenizer {

Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& model_dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(model_dir, ec)) {
    return absl::NotFoundError(absl::StrCat(model_dir, ": not a directory"));
  }
  const std::string json_path = (fs::path(model_dir) / "tokenizer.json").string();
  const std::string spm_path = (fs::path(model_dir) / "tokenizer.model").string();
  const bool has_json = fs::exists(json_path, ec);
  const bool has_spm = fs::exists(spm_path, ec);
  if (!has_json && !has_spm) {
    return absl::NotFoundError(
        absl::StrCat(model_dir, ": no tokenizer (neither tokenizer.json nor tokenizer.model)"));
  }
  ASSIGN_OR_RETURN(TokenizerConfig config, ReadTokenizerConfig(model_dir));
  if (has_json) {
    ASSIGN_OR_RETURN(std::string text, ReadFileToString(json_path));
    auto bpe = BpeTokenizer::Create(json_path, text, config);
    if (bpe.ok()) return std::unique_ptr<Tokenizer>(std::move(bpe).value());
    // A valid tokenizer.json of another kind (Gemma and Llama-2 ship a SentencePiece-style one next
    // to tokenizer.model): use tokenizer.model instead.
    if (!(bpe.status().code() == absl::StatusCode::kUnimplemented && has_spm)) return bpe.status();
  }
  ASSIGN_OR_RETURN(auto spm, SentencePieceTokenizer::Create(spm_path, config));
  return std::unique_ptr<Tokenizer>(std::move(spm));
}

}  // namespace crossdiff::tokenizer
