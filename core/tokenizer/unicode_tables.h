// Unicode character classes used by the pre-tokenizer regexes: \p{L}, \p{N} and \s (White_Space).
// The range tables are generated (tools/gen_unicode_tables.py -> unicode_tables.cc); the Unicode
// version is kUnicodeVersion. All functions are pure and thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>

namespace crossdiff::tokenizer::unicode {

struct CodePointRange {
  uint32_t lo;
  uint32_t hi;  // inclusive
};

extern const char kUnicodeVersion[];
extern const CodePointRange kLetterRanges[];
extern const size_t kLetterRangesSize;
extern const CodePointRange kNumberRanges[];
extern const size_t kNumberRangesSize;
extern const CodePointRange kWhiteSpaceRanges[];
extern const size_t kWhiteSpaceRangesSize;

// The class of a code point as the GPT-2 / Llama-3 regexes see it. Exactly one applies.
enum class CharClass : uint8_t { kLetter, kNumber, kWhiteSpace, kOther };

// Constant-time for the Basic Multilingual Plane (a table built once, on first use), binary search
// above.
CharClass Classify(uint32_t code_point);

inline bool IsLetter(uint32_t cp) { return Classify(cp) == CharClass::kLetter; }
inline bool IsNumber(uint32_t cp) { return Classify(cp) == CharClass::kNumber; }
inline bool IsWhiteSpace(uint32_t cp) { return Classify(cp) == CharClass::kWhiteSpace; }

}  // namespace crossdiff::tokenizer::unicode
