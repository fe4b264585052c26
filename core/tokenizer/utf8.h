// UTF-8 helpers for the tokenizers: decoding to code points with byte offsets, encoding, and the
// lossy decode of byte-level BPE output. Pure functions, thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace crossdiff::tokenizer::utf8 {

// Code points of an invalid byte b are reported as kInvalidByteBase + b: outside Unicode, so they
// classify as "other" (not letter, number or space) and their byte is kept as is.
constexpr uint32_t kInvalidByteBase = 0x110000;

// Decodes `text`: code_points[i] starts at byte offsets[i]; offsets has one more entry
// (text.size()). Every byte that is not part of a well-formed sequence becomes one kInvalidByteBase
// + byte entry.
void Decode(std::string_view text, std::vector<uint32_t>* code_points,
            std::vector<size_t>* offsets);

// Appends the UTF-8 encoding of a Unicode scalar value.
void Append(uint32_t code_point, std::string* out);

// Decodes bytes to valid UTF-8, replacing each maximal subpart of an ill-formed sequence with one
// U+FFFD (the Unicode "substitution of maximal subparts" practice, as Rust's
// String::from_utf8_lossy does).
std::string DecodeLossy(std::string_view bytes);

}  // namespace crossdiff::tokenizer::utf8
