#include <algorithm>
#include <array>

#include "core/tokenizer/unicode_tables.h"

namespace crossdiff::tokenizer::unicode {
namespace {

bool InRanges(const CodePointRange* ranges, size_t n, uint32_t cp) {
  const CodePointRange* end = ranges + n;
  // First range whose upper bound is >= cp.
  const CodePointRange* it = std::lower_bound(
      ranges, end, cp, [](const CodePointRange& r, uint32_t v) { return r.hi < v; });
  return it != end && it->lo <= cp;
}

CharClass ClassifySlow(uint32_t cp) {
  if (InRanges(kWhiteSpaceRanges, kWhiteSpaceRangesSize, cp)) return CharClass::kWhiteSpace;
  if (InRanges(kLetterRanges, kLetterRangesSize, cp)) return CharClass::kLetter;
  if (InRanges(kNumberRanges, kNumberRangesSize, cp)) return CharClass::kNumber;
  return CharClass::kOther;
}

using BmpTable = std::array<CharClass, 0x10000>;

const BmpTable& Bmp() {
  // Built once (thread-safe static initialisation), 64 KiB.
  static const BmpTable* table = [] {
    auto* t = new BmpTable;
    for (uint32_t cp = 0; cp < 0x10000; ++cp) (*t)[cp] = ClassifySlow(cp);
    return t;
  }();
  return *table;
}

}  // namespace

CharClass Classify(uint32_t code_point) {
  if (code_point < 0x10000) return Bmp()[code_point];
  return ClassifySlow(code_point);
}

}  // namespace crossdiff::tokenizer::unicode
