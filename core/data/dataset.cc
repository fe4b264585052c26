#include "core/data/dataset.h"

#include <algorithm>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/common/status_macros.h"
#include "core/data/jsonl_reader.h"
#include "core/data/packed_reader.h"
#include "core/data/tokens_reader.h"

namespace crossdiff::data {

int64_t TokenSequence::num_stored() const {
  return std::count(stored.begin(), stored.end(), uint8_t{1});
}

absl::StatusOr<DataFormat> ParseDataFormat(std::string_view name) {
  if (name == "text") return DataFormat::kText;
  if (name == "chat") return DataFormat::kChat;
  if (name == "tokens") return DataFormat::kTokens;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown data format \"", std::string(name), "\" (known: text, chat, tokens)"));
}

std::string_view DataFormatName(DataFormat format) {
  switch (format) {
    case DataFormat::kText:
      return "text";
    case DataFormat::kChat:
      return "chat";
    case DataFormat::kTokens:
      return "tokens";
  }
  return "?";
}

absl::StatusOr<DataFormat> DetectDataFormat(const std::string& path) {
  if (absl::EndsWith(absl::AsciiStrToLower(path), ".safetensors")) return DataFormat::kTokens;
  ASSIGN_OR_RETURN(auto reader, JsonlReader::Open(path));
  nlohmann::json first;
  ASSIGN_OR_RETURN(bool any, reader->Next(&first));
  if (!any) return absl::InvalidArgumentError(absl::StrCat(path, ": dataset is empty (no lines)"));
  if (first.is_object() && first.contains("messages")) return DataFormat::kChat;
  if (first.is_object() && first.contains("text")) return DataFormat::kText;
  return reader->LineError(
      "cannot tell the dataset format: expected an object with \"text\" or \"messages\"");
}

absl::StatusOr<std::unique_ptr<SequenceReader>> OpenSequenceReader(const DatasetOptions& options,
                                                                   const TextEncoder& encoder,
                                                                   SequenceRange range) {
  if (range.begin < 0 || range.end < range.begin) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad sequence range [", range.begin, ", ", range.end, ")"));
  }
  if (options.format == DataFormat::kTokens) return OpenTokensReader(options, range);
  if (options.skip_first < 0 || options.skip_first >= options.seq_len) {
    return absl::InvalidArgumentError(absl::StrCat(
        "skip_first (", options.skip_first, ") must be in [0, seq_len = ", options.seq_len, ")"));
  }
  return OpenPackedReader(options, encoder, range);
}

absl::StatusOr<int64_t> EffectiveSequenceLength(const DatasetOptions& options) {
  if (options.format == DataFormat::kTokens) {
    ASSIGN_OR_RETURN(TokensFileShape shape, ReadTokensFileShape(options));
    return shape.length;
  }
  if (options.seq_len <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("seq_len must be positive for a ",
                                                   std::string(DataFormatName(options.format)),
                                                   " dataset, got ", options.seq_len));
  }
  return options.seq_len;
}

absl::StatusOr<int64_t> CountSequences(const DatasetOptions& options, const TextEncoder& encoder,
                                       int64_t limit) {
  if (options.format == DataFormat::kTokens) {
    ASSIGN_OR_RETURN(TokensFileShape shape, ReadTokensFileShape(options));
    return std::min(shape.rows, limit);
  }
  ASSIGN_OR_RETURN(auto reader, OpenSequenceReader(options, encoder, {0, limit}));
  TokenSequence sequence;
  int64_t count = 0;
  while (true) {
    ASSIGN_OR_RETURN(bool more, reader->Next(&sequence));
    if (!more) break;
    ++count;
  }
  return count;
}

}  // namespace crossdiff::data
