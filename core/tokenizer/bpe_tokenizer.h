// Byte-level BPE from a Hugging Face tokenizer.json (GPT-2, Llama-3, Qwen2 kind). Private to
// crossdiff_tokenizer: users go through Tokenizer::Load.
//
// Encode follows the `tokenizers` library's pipeline:
//   1. added tokens with normalized=false are matched on the raw text (leftmost-longest, honouring
//      lstrip / rstrip / single_word), splitting it into added-token ids and text segments;
//   2. each text segment is normalized (no normalizer, or NFC as Qwen2 uses), then added tokens
//      with normalized=true are matched in it the same way;
//   3. each remaining segment goes through the pre-tokenizer (Split with a known regex and/or
//      ByteLevel), and every piece is byte-mapped and merged by rank (priority queue over the
//      symbol list);
//   4. with add_special, the BOS/EOS prefix and suffix (TemplateProcessing, or the config flags)
//      are added.
// Thread-safe: the only mutable state is the word cache, guarded by mutexes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "core/tokenizer/pretokenizer_regex.h"
#include "core/tokenizer/tokenizer.h"
#include "core/tokenizer/tokenizer_config.h"
#include "nlohmann/json_fwd.hpp"

namespace crossdiff::tokenizer {

class BpeTokenizer final : public Tokenizer {
 public:
  // Builds the tokenizer from the text of a tokenizer.json (`path` names it in errors).
  // Errors: INVALID_ARGUMENT (malformed file, naming the field); UNIMPLEMENTED when the file is
  // valid but is not a byte-level BPE this class supports (e.g. a SentencePiece-style BPE with a
  // Metaspace pre-tokenizer), so that the caller can fall back to tokenizer.model.
  static absl::StatusOr<std::unique_ptr<BpeTokenizer>> Create(const std::string& path,
                                                              std::string_view json_text,
                                                              const TokenizerConfig& config);

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                              bool add_special) const override;
  std::string Decode(const std::vector<int32_t>& ids) const override;
  int64_t vocab_size() const override { return vocab_size_; }
  std::optional<int32_t> TokenToId(std::string_view token) const override;
  std::optional<std::string> IdToToken(int32_t id) const override;
  std::string Fingerprint() const override { return fingerprint_; }
  std::string_view kind() const override { return "bpe"; }

 private:
  struct AddedToken {
    int32_t id = 0;
    std::string content;
    bool special = false, lstrip = false, rstrip = false, normalized = false, single_word = false;
  };
  // The added tokens matched in one pass, indexed by first byte, longest first.
  struct AddedTokenSet {
    std::vector<std::vector<const AddedToken*>> by_first_byte =
        std::vector<std::vector<const AddedToken*>>(256);
    bool empty = true;
  };
  struct PreTokenizerStep {
    bool byte_level = false;  // else a Split with `pattern`
    PreTokenizerPattern pattern = PreTokenizerPattern::kGpt2;
    bool add_prefix_space = false;
    bool use_regex = true;
  };
  struct Merge {
    int32_t rank;
    int32_t result;
  };
  // A run of text between added tokens, or one added token.
  struct Segment {
    size_t begin, end;
    int32_t added_id;  // -1 for text
  };

  BpeTokenizer() = default;
  absl::Status ParseModel(const std::string& path, const nlohmann::json& model);
  absl::Status ParseAddedTokens(const std::string& path, const nlohmann::json& root);
  absl::Status ParsePreTokenizer(const std::string& path, const nlohmann::json& node,
                                 const std::string& field);
  absl::Status ParsePostProcessor(const std::string& path, const nlohmann::json& node,
                                  const std::string& field);
  absl::Status ApplySpecialTokenPolicy(const std::string& path, const TokenizerConfig& config);
  void ComputeFingerprint();

  static void SplitOnAddedTokens(std::string_view text, size_t base, const AddedTokenSet& set,
                                 std::vector<Segment>* out);
  void EncodeText(std::string_view text, std::vector<int32_t>* ids) const;
  void EncodePiece(std::string_view piece, std::vector<int32_t>* ids) const;
  void MergeSymbols(std::vector<int32_t>* symbols) const;

  // Model.
  absl::flat_hash_map<std::string, int32_t> vocab_;  // byte-level spelling -> id
  std::vector<std::string> id_to_token_;             // "" where an id has no vocab entry
  std::vector<bool> id_in_vocab_;
  absl::flat_hash_map<uint64_t, Merge> merges_;  // (left id << 32 | right id) -> rank, result
  std::vector<std::pair<int32_t, int32_t>> merge_pairs_;  // in rank order, for the fingerprint
  int32_t byte_ids_[256];                                 // id of each byte's token, -1 when absent
  std::optional<int32_t> model_unk_id_;
  bool ignore_merges_ = false;
  // Added tokens.
  std::vector<std::unique_ptr<AddedToken>> added_;
  absl::flat_hash_map<std::string, int32_t> added_by_content_;
  absl::flat_hash_map<int32_t, const AddedToken*> added_by_id_;
  AddedTokenSet raw_added_, normalized_added_;
  bool nfc_ = false;  // normalizer
  // Pre-tokenizer and post-processor.
  std::vector<PreTokenizerStep> pre_steps_;
  std::vector<int32_t> template_prefix_, template_suffix_;
  std::vector<int32_t> special_prefix_, special_suffix_;  // what add_special adds
  int64_t vocab_size_ = 0;
  std::string fingerprint_;

  // Word cache: piece bytes -> ids, split into shards (by hash) so that concurrent encoders rarely
  // contend for one lock. Bounded: once a shard is full, new pieces are not cached.
  struct CacheShard {
    absl::Mutex mutex;
    absl::flat_hash_map<std::string, std::vector<int32_t>> words ABSL_GUARDED_BY(mutex);
  };
  static constexpr size_t kCacheShards = 16;
  static constexpr size_t kMaxCachedWordsPerShard = (size_t{1} << 18) / kCacheShards;
  mutable CacheShard cache_[kCacheShards];
};

}  // namespace crossdiff::tokenizer
