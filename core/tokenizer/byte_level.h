// GPT-2's reversible byte <-> character mapping ("bytes_to_unicode"): byte-level BPE vocabularies
// spell every byte as one printable character (space is "Ġ" = U+0120, newline "Ċ" = U+010A, ...).
// Pure functions over static tables, thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace crossdiff::tokenizer::byte_level {

// The character (code point) that stands for byte b.
uint32_t ByteToCodePoint(uint8_t b);
// UTF-8 of ByteToCodePoint(b).
const std::string& ByteToToken(uint8_t b);
// The byte a code point stands for, or -1 when it is not one of the 256 byte characters.
int CodePointToByte(uint32_t code_point);

// Maps every byte of `bytes` to its character (UTF-8), e.g. " hi" -> "Ġhi".
std::string Encode(std::string_view bytes);

// Inverse of Encode for a token string. Returns false (and leaves *out unspecified) when some
// character of `token` is not a byte character; Hugging Face's ByteLevel decoder then keeps the
// token's own UTF-8.
bool DecodeToken(std::string_view token, std::string* out);

}  // namespace crossdiff::tokenizer::byte_level
