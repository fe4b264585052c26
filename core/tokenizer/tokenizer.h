// Text <-> token ids for a Hugging Face model directory.
//
// Two kinds of tokenizer are supported (docs/tokenizers.md):
//   - `tokenizer.json` byte-level BPE (GPT-2, Llama-3, Qwen2): pre-tokenizer regex, merges,
//     added and special tokens, ByteLevel decoder;
//   - SentencePiece `tokenizer.model` (Gemma, Llama-2) through libsentencepiece.
// `Load` prefers a byte-level tokenizer.json, else tokenizer.model, and reads
// tokenizer_config.json (when present) for the BOS/EOS policy, the special token strings and the
// chat template.
//
// Thread-safety: a loaded Tokenizer is immutable from the caller's point of view; Encode, Decode
// and every accessor are const and safe to call concurrently from many threads (internal caches are
// locked).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace crossdiff::tokenizer {

// What tokenizer_config.json (and, for BPE, tokenizer.json's post_processor) says about special
// tokens. Token strings are empty when the config does not name them.
struct SpecialTokens {
  std::string bos_token;
  std::string eos_token;
  std::string pad_token;
  std::string unk_token;
  std::optional<int32_t> bos_id;
  std::optional<int32_t> eos_id;
  std::optional<int32_t> pad_id;
  std::optional<int32_t> unk_id;
  // Whether Encode(text, add_special=true) prepends BOS / appends EOS.
  bool add_bos = false;
  bool add_eos = false;
  // The Jinja chat template string of tokenizer_config.json ("chat_template"), empty when absent.
  std::string chat_template;
};

class Tokenizer {
 public:
  // Loads the tokenizer of a model directory: DIR/tokenizer.json if present and byte-level BPE,
  // else DIR/tokenizer.model, plus DIR/tokenizer_config.json when present. The caller owns the
  // result. Errors: NOT_FOUND when DIR is not a directory or has neither tokenizer file;
  // INVALID_ARGUMENT naming the file and field when a file is malformed; UNIMPLEMENTED naming the
  // field when tokenizer.json is of an unsupported kind and there is no tokenizer.model.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& model_dir);

  virtual ~Tokenizer();

  // Token ids of `text` (UTF-8; invalid bytes are tokenized as bytes for byte-level BPE).
  // Added/special tokens written literally in `text` (e.g. "<|endoftext|>") map to their ids. With
  // `add_special`, the BOS/EOS policy of the config is applied (post_processor TemplateProcessing
  // or add_bos/add_eos); without it, no BOS/EOS is added. Errors: INVALID_ARGUMENT only for text
  // the model cannot represent.
  virtual absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                                      bool add_special) const = 0;

  // Text of `ids`. Special tokens are rendered as their strings; ids out of range are skipped.
  // Bytes that do not form valid UTF-8 become U+FFFD (one per maximal invalid subsequence).
  virtual std::string Decode(const std::vector<int32_t>& ids) const = 0;

  // Number of ids: the largest id + 1 over the model vocabulary and the added tokens.
  virtual int64_t vocab_size() const = 0;

  // Id of a token string exactly as stored in the vocabulary or the added tokens ("<|im_start|>",
  // "<start_of_turn>"); nullopt when unknown. Useful for chat formats.
  virtual std::optional<int32_t> TokenToId(std::string_view token) const = 0;
  // Stored string of an id (byte-level BPE: the GPT-2 byte alphabet form, e.g. "Ġthe"); nullopt
  // when out of range.
  virtual std::optional<std::string> IdToToken(int32_t id) const = 0;

  // Stable content hash (SHA-256, hex) of everything that decides the ids of a text: vocabulary,
  // merges / SentencePiece model, added tokens, normalizer, pre-tokenizer and the BOS/EOS ids that
  // add_special adds. Two models share a tokenizer iff their fingerprints are equal. Independent of
  // file formatting (legacy "a b" vs [["a","b"]] merges give the same fingerprint) and of the chat
  // template.
  virtual std::string Fingerprint() const = 0;

  // "bpe" or "sentencepiece".
  virtual std::string_view kind() const = 0;

  std::optional<int32_t> bos_id() const { return special_.bos_id; }
  std::optional<int32_t> eos_id() const { return special_.eos_id; }
  std::optional<int32_t> pad_id() const { return special_.pad_id; }
  const std::string& bos_token() const { return special_.bos_token; }
  const std::string& eos_token() const { return special_.eos_token; }
  const std::string& pad_token() const { return special_.pad_token; }
  // From tokenizer_config.json; may be empty.
  const std::string& chat_template() const { return special_.chat_template; }
  const SpecialTokens& special_tokens() const { return special_; }

 protected:
  Tokenizer() = default;
  SpecialTokens special_;
};

}  // namespace crossdiff::tokenizer
