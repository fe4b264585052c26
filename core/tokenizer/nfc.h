// Unicode Normalization Form C, as the `NFC` normalizer of a tokenizer.json (Qwen2) applies it.
// Pure function over static tables built once; thread-safe.
#pragma once

#include <string>
#include <string_view>

namespace crossdiff::tokenizer::unicode {

// The NFC form of UTF-8 `text` (canonical decomposition, canonical ordering, canonical composition,
// Hangul included). Bytes that are not valid UTF-8 are kept unchanged and act as starters that
// never compose. Text whose code points are all below U+0300 is returned unchanged without
// decoding.
std::string ToNfc(std::string_view text);

}  // namespace crossdiff::tokenizer::unicode
