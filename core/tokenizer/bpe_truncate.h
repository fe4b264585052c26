// Writes a smaller copy of a byte-level BPE tokenizer: used to give small-vocabulary test models
// (e.g. the 512-id fixture models) a real tokenizer whose ids all fit their embedding table.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"

namespace crossdiff::tokenizer {

// Reads `src_tokenizer_json` (a byte-level BPE tokenizer.json whose first 256 ids are the 256 byte
// tokens and whose merge i produces id 256 + i, as GPT-2-style tokenizers do) and writes
// DST_DIR/tokenizer.json keeping only ids < `vocab_size`: the vocabulary entries with id <
// vocab_size, the merges whose result id is < vocab_size, and the added tokens with id <
// vocab_size. Also writes DST_DIR/tokenizer_config.json (copied from the source directory when
// present, with special tokens whose id was dropped removed). Creates DST_DIR if needed. Errors:
// INVALID_ARGUMENT when the source is not byte-level BPE, vocab_size < 256, or a kept merge refers
// to a dropped token; NOT_FOUND / INTERNAL for file errors.
absl::Status WriteTruncatedBpeTokenizer(const std::string& src_tokenizer_json, int64_t vocab_size,
                                        const std::string& dst_dir);

}  // namespace crossdiff::tokenizer
