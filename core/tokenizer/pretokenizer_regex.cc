#include "core/tokenizer/pretokenizer_regex.h"

#include <cstdint>

#include "core/tokenizer/unicode_tables.h"
#include "core/tokenizer/utf8.h"

namespace crossdiff::tokenizer {
namespace {

using unicode::CharClass;

constexpr char kGpt2Regex[] =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr char kLlama3Regex[] =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|)"
    R"( ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr char kQwen2Regex[] = R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|)"
                               R"( ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// The code points of one segment with their classes; matchers return the end index of a match at
// `i` (exclusive), or i when the alternative does not match.
class Matcher {
 public:
  explicit Matcher(const std::vector<uint32_t>& cps) : cps_(cps), n_(cps.size()) {
    classes_.reserve(n_);
    for (uint32_t cp : cps) classes_.push_back(unicode::Classify(cp));
  }

  size_t size() const { return n_; }

  size_t MatchGpt2(size_t i) const {
    size_t e;
    if ((e = Contraction(i, /*ignore_case=*/false)) > i) return e;
    if ((e = OptionalSpaceThenRun(i, CharClass::kLetter)) > i) return e;
    if ((e = OptionalSpaceThenRun(i, CharClass::kNumber)) > i) return e;
    if ((e = OptionalSpaceThenRun(i, CharClass::kOther)) > i) return e;
    return WhiteSpaceTail(i);
  }

  // Llama-3 (max_digits = 3) and Qwen2 (max_digits = 1).
  size_t MatchLlama3(size_t i, size_t max_digits) const {
    size_t e;
    if ((e = Contraction(i, /*ignore_case=*/true)) > i) return e;
    // [^\r\n\p{L}\p{N}]?\p{L}+
    if (i + 1 < n_ && !IsNewline(i) &&
        (classes_[i] == CharClass::kWhiteSpace || classes_[i] == CharClass::kOther) &&
        classes_[i + 1] == CharClass::kLetter) {
      return Run(i + 1, CharClass::kLetter);
    }
    if (classes_[i] == CharClass::kLetter) return Run(i, CharClass::kLetter);
    // \p{N}{1,K}
    if (classes_[i] == CharClass::kNumber) {
      e = i;
      while (e < n_ && e - i < max_digits && classes_[e] == CharClass::kNumber) ++e;
      return e;
    }
    // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
    size_t start = i;
    if (cps_[i] == ' ' && i + 1 < n_ && classes_[i + 1] == CharClass::kOther) start = i + 1;
    if (classes_[start] == CharClass::kOther) {
      e = Run(start, CharClass::kOther);
      while (e < n_ && IsNewline(e)) ++e;
      return e;
    }
    // \s*[\r\n]+ : whitespace run up to and including its last \r or \n.
    if (classes_[i] == CharClass::kWhiteSpace) {
      const size_t run_end = Run(i, CharClass::kWhiteSpace);
      for (size_t k = run_end; k > i; --k) {
        if (IsNewline(k - 1)) return k;
      }
    }
    return WhiteSpaceTail(i);
  }

 private:
  bool IsNewline(size_t k) const { return cps_[k] == '\r' || cps_[k] == '\n'; }

  size_t Run(size_t i, CharClass c) const {
    while (i < n_ && classes_[i] == c) ++i;
    return i;
  }

  // Case-insensitive matching follows Unicode simple case folding: 's' also matches U+017F (long s)
  // and 'k' would match U+212A; no other letter of these suffixes has a non-ASCII fold.
  static bool SameLetter(uint32_t cp, char lower, bool ignore_case) {
    if (cp == static_cast<uint32_t>(lower)) return true;
    if (!ignore_case) return false;
    if (cp == static_cast<uint32_t>(lower - 'a' + 'A')) return true;
    return lower == 's' && cp == 0x17F;
  }

  // 's|'t|'re|'ve|'m|'ll|'d (alternatives tried in this order; none is a prefix of another).
  size_t Contraction(size_t i, bool ignore_case) const {
    if (cps_[i] != '\'' || i + 1 >= n_) return i;
    const uint32_t a = cps_[i + 1];
    for (char single : {'s', 't'}) {
      if (SameLetter(a, single, ignore_case)) return i + 2;
    }
    if (i + 2 < n_) {
      const uint32_t b = cps_[i + 2];
      if (SameLetter(a, 'r', ignore_case) && SameLetter(b, 'e', ignore_case)) return i + 3;
      if (SameLetter(a, 'v', ignore_case) && SameLetter(b, 'e', ignore_case)) return i + 3;
    }
    if (SameLetter(a, 'm', ignore_case)) return i + 2;
    if (i + 2 < n_ && SameLetter(a, 'l', ignore_case) &&
        SameLetter(cps_[i + 2], 'l', ignore_case)) {
      return i + 3;
    }
    if (SameLetter(a, 'd', ignore_case)) return i + 2;
    return i;
  }

  // ` ?X+` where X is a class (kOther stands for [^\s\p{L}\p{N}]).
  size_t OptionalSpaceThenRun(size_t i, CharClass c) const {
    if (cps_[i] == ' ' && i + 1 < n_ && classes_[i + 1] == c) return Run(i + 1, c);
    if (classes_[i] == c) return Run(i, c);
    return i;
  }

  // \s+(?!\S)|\s+ : a whitespace run, minus its last character when a non-space follows (that
  // character then starts the next piece), unless the run is a single character.
  size_t WhiteSpaceTail(size_t i) const {
    if (classes_[i] != CharClass::kWhiteSpace) return i;
    const size_t run_end = Run(i, CharClass::kWhiteSpace);
    if (run_end == n_) return run_end;
    if (run_end - i >= 2) return run_end - 1;
    return run_end;
  }

  const std::vector<uint32_t>& cps_;
  const size_t n_;
  std::vector<CharClass> classes_;
};

}  // namespace

std::optional<PreTokenizerPattern> RecognizeSplitRegex(const std::string& regex) {
  if (regex == kGpt2Regex) return PreTokenizerPattern::kGpt2;
  if (regex == kLlama3Regex) return PreTokenizerPattern::kLlama3;
  if (regex == kQwen2Regex) return PreTokenizerPattern::kQwen2;
  return std::nullopt;
}

void SplitPieces(PreTokenizerPattern pattern, std::string_view text,
                 std::vector<std::string_view>* pieces) {
  pieces->clear();
  if (text.empty()) return;
  std::vector<uint32_t> cps;
  std::vector<size_t> offsets;
  utf8::Decode(text, &cps, &offsets);
  const Matcher matcher(cps);
  size_t gap_start = 0;  // start of text not covered by a match yet
  size_t i = 0;
  while (i < matcher.size()) {
    size_t end;
    switch (pattern) {
      case PreTokenizerPattern::kGpt2:
        end = matcher.MatchGpt2(i);
        break;
      case PreTokenizerPattern::kLlama3:
        end = matcher.MatchLlama3(i, 3);
        break;
      case PreTokenizerPattern::kQwen2:
      default:
        end = matcher.MatchLlama3(i, 1);
        break;
    }
    if (end == i) {  // no alternative matches here: the character joins the gap
      ++i;
      continue;
    }
    if (gap_start < i)
      pieces->push_back(text.substr(offsets[gap_start], offsets[i] - offsets[gap_start]));
    pieces->push_back(text.substr(offsets[i], offsets[end] - offsets[i]));
    i = end;
    gap_start = end;
  }
  if (gap_start < matcher.size()) {
    pieces->push_back(text.substr(offsets[gap_start], text.size() - offsets[gap_start]));
  }
}

}  // namespace crossdiff::tokenizer
