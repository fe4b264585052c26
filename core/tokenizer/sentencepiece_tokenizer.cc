#include "core/tokenizer/sentencepiece_tokenizer.h"

#include "absl/strings/str_cat.h"
#include "core/common/status_macros.h"
#include "core/tokenizer/sha256.h"

namespace crossdiff::tokenizer {

SentencePieceTokenizer::SentencePieceTokenizer() : processor_(std::make_unique<SpmProcessor>()) {}

SentencePieceTokenizer::~SentencePieceTokenizer() = default;

absl::StatusOr<std::unique_ptr<SentencePieceTokenizer>> SentencePieceTokenizer::Create(
    const std::string& model_path, const TokenizerConfig& config) {
  ASSIGN_OR_RETURN(std::string bytes, ReadFileToString(model_path));
  std::unique_ptr<SentencePieceTokenizer> tok(new SentencePieceTokenizer());
  std::string error;
  if (!tok->processor_->LoadFromSerialized(bytes, &error)) {
    return absl::InvalidArgumentError(
        absl::StrCat(model_path, ": not a SentencePiece model: ", error));
  }
  SpecialTokens& s = tok->special_;
  s.bos_token = config.bos_token;
  s.eos_token = config.eos_token;
  s.pad_token = config.pad_token;
  s.unk_token = config.unk_token;
  s.chat_template = config.chat_template;
  auto resolve = [&](const std::string& token, int model_id) -> std::optional<int32_t> {
    if (!token.empty()) return tok->TokenToId(token);
    if (model_id >= 0) return model_id;
    return std::nullopt;
  };
  const auto& sp = *tok->processor_;
  s.bos_id = resolve(config.bos_token, sp.bos_id());
  s.eos_id = resolve(config.eos_token, sp.eos_id());
  s.pad_id = resolve(config.pad_token, sp.pad_id());
  s.unk_id = resolve(config.unk_token, sp.unk_id());
  s.add_bos = config.add_bos_token.value_or(true);
  s.add_eos = config.add_eos_token.value_or(false);
  if (s.add_bos && !s.bos_id) {
    return absl::InvalidArgumentError(
        absl::StrCat(model_path, ": add_bos_token is set but the model has no BOS token"));
  }
  if (s.add_eos && !s.eos_id) {
    return absl::InvalidArgumentError(
        absl::StrCat(model_path, ": add_eos_token is set but the model has no EOS token"));
  }

  Sha256 h;
  h.UpdateField("crossdiff.tokenizer.sentencepiece.v1");
  h.UpdateField(sp.SerializedModel());
  h.UpdateField(
      absl::StrCat("bos ", s.add_bos ? *s.bos_id : -1, " eos ", s.add_eos ? *s.eos_id : -1));
  tok->fingerprint_ = h.HexDigest();
  return tok;
}

absl::StatusOr<std::vector<int32_t>> SentencePieceTokenizer::Encode(std::string_view text,
                                                                    bool add_special) const {
  std::vector<int> pieces;
  std::string error;
  if (!processor_->Encode(text, &pieces, &error)) {
    return absl::InvalidArgumentError(absl::StrCat("sentencepiece encode: ", error));
  }
  std::vector<int32_t> ids;
  ids.reserve(pieces.size() + 2);
  if (add_special && special_.add_bos) ids.push_back(*special_.bos_id);
  ids.insert(ids.end(), pieces.begin(), pieces.end());
  if (add_special && special_.add_eos) ids.push_back(*special_.eos_id);
  return ids;
}

std::string SentencePieceTokenizer::Decode(const std::vector<int32_t>& ids) const {
  std::string out, text;
  std::vector<int> run;
  auto flush = [&] {
    if (run.empty()) return;
    if (processor_->Decode(run, &text)) out += text;
    run.clear();
  };
  const int n = processor_->piece_size();
  for (int32_t id : ids) {
    if (id < 0 || id >= n) continue;
    if (processor_->IsControl(id)) {
      flush();
      out += processor_->IdToPiece(id);
    } else {
      run.push_back(id);
    }
  }
  flush();
  return out;
}

int64_t SentencePieceTokenizer::vocab_size() const { return processor_->piece_size(); }

std::optional<int32_t> SentencePieceTokenizer::TokenToId(std::string_view token) const {
  const int id = processor_->PieceToId(token);
  // PieceToId answers unk_id for unknown pieces; only the unk piece itself maps there legitimately.
  if (id == processor_->unk_id() && processor_->IdToPiece(id) != token) return std::nullopt;
  return id;
}

std::optional<std::string> SentencePieceTokenizer::IdToToken(int32_t id) const {
  if (id < 0 || id >= processor_->piece_size()) return std::nullopt;
  return processor_->IdToPiece(id);
}

}  // namespace crossdiff::tokenizer
