// Hand-written matchers for the pre-tokenizer regexes of byte-level BPE tokenizers. No regex
// library in Debian 12's C++ toolchain handles \p{L}/\p{N} with Oniguruma's semantics, and these
// patterns are fixed, so each is implemented directly over code points, alternative by alternative,
// with the same leftmost- first alternation and backtracking results as the regex (checked against
// Hugging Face's outputs in tests/tokenizer). Pure functions, thread-safe.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace crossdiff::tokenizer {

enum class PreTokenizerPattern {
  // GPT-2 (ByteLevel use_regex=true):
  //   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  kGpt2,
  // Llama-3 / cl100k (Split, Isolated):
  //   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
  //   \s*[\r\n]+|\s+(?!\S)|\s+
  kLlama3,
  // Qwen2: as Llama-3 but \p{N} (one digit per piece).
  kQwen2,
};

// The pattern whose regex source (as written in tokenizer.json's Split "Regex") is `regex`, or
// nullopt.
std::optional<PreTokenizerPattern> RecognizeSplitRegex(const std::string& regex);

// Splits `text` into consecutive pieces (regex matches, plus any unmatched gaps, as the Split
// pre-tokenizer with behavior "Isolated" does). Concatenating the pieces gives `text` back. Bytes
// that are not valid UTF-8 are treated as single "other" characters. Pieces view `text`.
void SplitPieces(PreTokenizerPattern pattern, std::string_view text,
                 std::vector<std::string_view>* pieces);

}  // namespace crossdiff::tokenizer
