#include "core/tokenizer/utf8.h"

namespace crossdiff::tokenizer::utf8 {
namespace {

// Length of the well-formed prefix of a sequence at `s` (Unicode Table 3-7), and its value.
// Returns 0 when the sequence at s is ill-formed; *maximal_subpart is then the number of bytes that
// form the maximal subpart (>= 1) to replace by one U+FFFD.
size_t DecodeOne(const unsigned char* s, size_t n, uint32_t* cp, size_t* maximal_subpart) {
  const unsigned char b0 = s[0];
  *maximal_subpart = 1;
  if (b0 < 0x80) {
    *cp = b0;
    return 1;
  }
  size_t len;
  unsigned char lo = 0x80, hi = 0xBF;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    len = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    len = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    len = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  uint32_t value = b0 & (len == 2 ? 0x1F : len == 3 ? 0x0F : 0x07);
  for (size_t i = 1; i < len; ++i) {
    if (i >= n) return 0;
    const unsigned char b = s[i];
    const unsigned char l = i == 1 ? lo : 0x80, h = i == 1 ? hi : 0xBF;
    if (b < l || b > h) return 0;
    value = (value << 6) | (b & 0x3F);
    *maximal_subpart = i + 1;
  }
  *cp = value;
  return len;
}

}  // namespace

void Decode(std::string_view text, std::vector<uint32_t>* code_points,
            std::vector<size_t>* offsets) {
  code_points->clear();
  offsets->clear();
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  size_t i = 0;
  while (i < text.size()) {
    uint32_t cp;
    size_t subpart;
    const size_t len = DecodeOne(s + i, text.size() - i, &cp, &subpart);
    offsets->push_back(i);
    if (len == 0) {
      code_points->push_back(kInvalidByteBase + s[i]);
      i += 1;
    } else {
      code_points->push_back(cp);
      i += len;
    }
  }
  offsets->push_back(text.size());
}

void Append(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::string DecodeLossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  const auto* s = reinterpret_cast<const unsigned char*>(bytes.data());
  size_t i = 0;
  while (i < bytes.size()) {
    uint32_t cp;
    size_t subpart;
    const size_t len = DecodeOne(s + i, bytes.size() - i, &cp, &subpart);
    if (len == 0) {
      out += "\xEF\xBF\xBD";  // U+FFFD
      i += subpart;
    } else {
      out.append(bytes.substr(i, len));
      i += len;
    }
  }
  return out;
}

}  // namespace crossdiff::tokenizer::utf8
