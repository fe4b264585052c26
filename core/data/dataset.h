// Datasets for harvesting: a numbered list of token sequences, read as a stream.
//
// Formats (docs/datasets.md):
//   text    JSONL, one {"text": "..."} per line;
//   chat    JSONL, one {"messages": [{"role": ..., "content": ...}, ...]} per line, rendered with a
//           ChatFormat (core/data/chat_format.h);
//   tokens  a safetensors file with `input_ids` [sequences, length] (I32 or I64) and optionally
//           `attention_mask` (same shape; 0 = padding). Rows are taken as they are (no packing):
//           sequence_id = row, position = column.
//
// Packing (text and chat): every document is encoded without special tokens; documents are joined
// into one token stream with EOS between consecutive documents (when the tokenizer has an EOS id),
// and the stream is cut into sequences of seq_len tokens, each starting with BOS (when the
// tokenizer has a BOS id) followed by the next seq_len - 1 stream tokens. The last sequence may be
// shorter. A sequence's position of a token is its column in the sequence.
//
// --skip-first N: the first N attended tokens of every sequence (the BOS / attention-sink tokens)
// are still fed to the model but marked not stored.
//
// Readers stream: JSONL files are read line by line, safetensors files through a memory map; memory
// is bounded by one document plus one sequence. Readers are not thread-safe; the functions are.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "core/data/chat_format.h"
#include "core/data/sequence_range.h"

namespace crossdiff::data {

enum class DataFormat { kText, kChat, kTokens };

// "text", "chat", "tokens". INVALID_ARGUMENT otherwise.
absl::StatusOr<DataFormat> ParseDataFormat(std::string_view name);
std::string_view DataFormatName(DataFormat format);
// For "auto": `*.safetensors` -> tokens; otherwise the first non-blank JSONL line decides: an
// object with "messages" -> chat, with "text" -> text. Errors name the file (and line).
absl::StatusOr<DataFormat> DetectDataFormat(const std::string& path);

// How text becomes token ids (the caller wraps the model's tokenizer). `encode` must not add
// special tokens. Not needed for the tokens format.
struct TextEncoder {
  std::function<absl::StatusOr<std::vector<int32_t>>(std::string_view text)> encode;
  std::optional<int32_t> bos_id;
  std::optional<int32_t> eos_id;
};

struct DatasetOptions {
  std::string path;
  DataFormat format = DataFormat::kText;
  ChatFormat chat_format = ChatFormat::kChatML;  // chat only
  // text/chat: length of the packed sequences (> 0). tokens: 0 = the file's row length; otherwise
  // rows longer than seq_len are cut to their first seq_len columns.
  int64_t seq_len = 0;
  int64_t skip_first = 0;
};

struct TokenSequence {
  int64_t sequence_id = 0;         // index in the dataset (row of input_ids for tokens)
  std::vector<int32_t> token_ids;  // model input; position of token j is j
  std::vector<uint8_t> attention;  // 1 = real token, 0 = padding in the input file
  std::vector<uint8_t> stored;     // 1 = harvest this token (attended, past the first skip_first)
  int64_t length() const { return static_cast<int64_t>(token_ids.size()); }
  int64_t num_stored() const;
};

class SequenceReader {
 public:
  virtual ~SequenceReader() = default;
  // Fills `*out` with the next sequence of the range, in increasing sequence_id order; returns
  // false after the last. Errors name the file (and JSONL line). A dataset without any token gives
  // INVALID_ARGUMENT "... is empty ...", whatever the range.
  virtual absl::StatusOr<bool> Next(TokenSequence* out) = 0;
  // Moves forward so that Next returns `sequence_id` next (or the first sequence after it in the
  // range, or false at the end); the sequences skipped are treated as those before the opened
  // range are. Lazy: the skipping happens in the next Next call. A target at or behind the
  // reader's position changes nothing.
  virtual void SkipTo(int64_t sequence_id) = 0;
};

// Opens a reader over the sequences whose index lies in `range`. Sequences before the range are
// skipped (text/chat: still tokenised, since packing needs the token count; tokens: jumped over).
absl::StatusOr<std::unique_ptr<SequenceReader>> OpenSequenceReader(const DatasetOptions& options,
                                                                   const TextEncoder& encoder,
                                                                   SequenceRange range = {});

// The sequence length used: options.seq_len for text/chat (INVALID_ARGUMENT when <= 0); for tokens
// the file's row length, capped by options.seq_len when that is > 0.
absl::StatusOr<int64_t> EffectiveSequenceLength(const DatasetOptions& options);

// Number of sequences in the dataset, at most `limit` (a tokenising pass for text/chat that stops
// at the limit; the header for tokens). INVALID_ARGUMENT when the dataset is empty.
absl::StatusOr<int64_t> CountSequences(const DatasetOptions& options, const TextEncoder& encoder,
                                       int64_t limit = kUnboundedSequences);

}  // namespace crossdiff::data
