// SentencePiece tokenizer.model (Gemma, Llama-2) through libsentencepiece. Private to
// crossdiff_tokenizer. Thread-safe: SentencePieceProcessor's Encode/Decode are const and keep no
// mutable state.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "core/tokenizer/spm_processor.h"
#include "core/tokenizer/tokenizer.h"
#include "core/tokenizer/tokenizer_config.h"

namespace crossdiff::tokenizer {

class SentencePieceTokenizer final : public Tokenizer {
 public:
  // Loads `model_path` (a serialized SentencePiece ModelProto). BOS/EOS policy:
  // tokenizer_config.json's add_bos_token (default true, as LlamaTokenizer / GemmaTokenizer) and
  // add_eos_token (default false); BOS/EOS ids from its bos_token / eos_token strings, else from
  // the model's own bos/eos pieces. Errors: INVALID_ARGUMENT naming the file when it is not a
  // SentencePiece model.
  static absl::StatusOr<std::unique_ptr<SentencePieceTokenizer>> Create(
      const std::string& model_path, const TokenizerConfig& config);
  ~SentencePieceTokenizer() override;

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                              bool add_special) const override;
  // Control pieces (<s>, </s>, <pad>...) are written as their piece strings; other runs of ids are
  // decoded by SentencePiece (which removes the dummy-prefix space of each run).
  std::string Decode(const std::vector<int32_t>& ids) const override;
  int64_t vocab_size() const override;
  std::optional<int32_t> TokenToId(std::string_view token) const override;
  std::optional<std::string> IdToToken(int32_t id) const override;
  std::string Fingerprint() const override { return fingerprint_; }
  std::string_view kind() const override { return "sentencepiece"; }

 private:
  SentencePieceTokenizer();
  std::unique_ptr<SpmProcessor> processor_;
  std::string fingerprint_;
};

}  // namespace crossdiff::tokenizer
