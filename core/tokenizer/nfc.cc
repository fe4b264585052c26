#include "core/tokenizer/nfc.h"

#include <algorithm>
#include <cstdint>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/tokenizer/nfc_tables.h"
#include "core/tokenizer/utf8.h"

namespace crossdiff::tokenizer::unicode {
namespace {

// Hangul syllable arithmetic (Unicode 3.12).
constexpr uint32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr uint32_t kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount,
                   kSCount = kLCount * kNCount;

struct NfcData {
  std::unordered_map<uint32_t, std::pair<uint32_t, uint32_t>> decomposition;
  std::unordered_map<uint64_t, uint32_t> composition;  // (first << 32 | second) -> composite
};

const NfcData& Data() {
  static const NfcData* data = [] {
    auto* d = new NfcData;
    d->decomposition.reserve(kCanonicalDecompositionsSize);
    for (size_t i = 0; i < kCanonicalDecompositionsSize; ++i) {
      const CanonicalDecomposition& e = kCanonicalDecompositions[i];
      d->decomposition.emplace(e.code_point, std::make_pair(e.first, e.second));
      if (e.composes) d->composition.emplace((uint64_t{e.first} << 32) | e.second, e.code_point);
    }
    return d;
  }();
  return *data;
}

uint8_t CombiningClass(uint32_t cp) {
  if (cp < 0x300) return 0;
  const CombiningClassRange* begin = kCombiningClassRanges;
  const CombiningClassRange* end = begin + kCombiningClassRangesSize;
  const CombiningClassRange* it = std::lower_bound(
      begin, end, cp, [](const CombiningClassRange& r, uint32_t v) { return r.hi < v; });
  return it != end && it->lo <= cp ? it->combining_class : 0;
}

void Decompose(uint32_t cp, const NfcData& data, std::vector<uint32_t>* out) {
  if (cp >= kSBase && cp < kSBase + kSCount) {
    const uint32_t s = cp - kSBase;
    out->push_back(kLBase + s / kNCount);
    out->push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount != 0) out->push_back(kTBase + s % kTCount);
    return;
  }
  auto it = data.decomposition.find(cp);
  if (it == data.decomposition.end()) {
    out->push_back(cp);
    return;
  }
  Decompose(it->second.first, data, out);
  if (it->second.second != 0) Decompose(it->second.second, data, out);
}

// The primary composite of (a, b), or 0.
uint32_t Compose(uint32_t a, uint32_t b, const NfcData& data) {
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount) {
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  }
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase &&
      b < kTBase + kTCount) {
    return a + (b - kTBase);
  }
  auto it = data.composition.find((uint64_t{a} << 32) | b);
  return it == data.composition.end() ? 0 : it->second;
}

}  // namespace

std::string ToNfc(std::string_view text) {
  // Every code point below U+0300 is NFC-stable with combining class 0, and such code points are
  // encoded with lead bytes below 0xCC: without a byte >= 0xCC there is nothing to do.
  if (std::none_of(text.begin(), text.end(),
                   [](char c) { return static_cast<unsigned char>(c) >= 0xCC; })) {
    return std::string(text);
  }
  const NfcData& data = Data();
  std::vector<uint32_t> cps, decomposed;
  std::vector<size_t> offsets;
  utf8::Decode(text, &cps, &offsets);
  decomposed.reserve(cps.size() + 8);
  for (uint32_t cp : cps) Decompose(cp, data, &decomposed);

  // Canonical ordering: stable sort of every run of non-starters by combining class.
  for (size_t i = 0; i < decomposed.size();) {
    if (CombiningClass(decomposed[i]) == 0) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < decomposed.size() && CombiningClass(decomposed[j]) != 0) ++j;
    std::stable_sort(decomposed.begin() + i, decomposed.begin() + j,
                     [](uint32_t a, uint32_t b) { return CombiningClass(a) < CombiningClass(b); });
    i = j;
  }

  // Canonical composition (UAX #15): each character composes with the last starter unless blocked.
  std::vector<uint32_t> composed;
  composed.reserve(decomposed.size());
  size_t starter = 0;
  bool have_starter = false;
  int last_class = -1;  // class of the last character appended after the starter; -1: none
  for (uint32_t cp : decomposed) {
    const int cls = CombiningClass(cp);
    if (have_starter) {
      const bool blocked = last_class != -1 && (last_class == 0 || last_class >= cls);
      if (!blocked) {
        if (const uint32_t c = Compose(composed[starter], cp, data); c != 0) {
          composed[starter] = c;
          continue;
        }
      }
    }
    if (cls == 0) {
      starter = composed.size();
      have_starter = true;
      last_class = -1;
    } else {
      last_class = cls;
    }
    composed.push_back(cp);
  }

  std::string out;
  out.reserve(text.size());
  for (uint32_t cp : composed) {
    if (cp >= utf8::kInvalidByteBase) {
      out.push_back(static_cast<char>(cp - utf8::kInvalidByteBase));
    } else {
      utf8::Append(cp, &out);
    }
  }
  return out;
}

}  // namespace crossdiff::tokenizer::unicode
