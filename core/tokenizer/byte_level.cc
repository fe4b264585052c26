#include "core/tokenizer/byte_level.h"

#include <array>
#include <vector>

#include "core/tokenizer/utf8.h"

namespace crossdiff::tokenizer::byte_level {
namespace {

struct Tables {
  std::array<uint32_t, 256> byte_to_cp;
  std::array<std::string, 256> byte_to_token;
  std::array<int16_t, 512> cp_to_byte;  // every byte character is < U+0200
};

const Tables& GetTables() {
  static const Tables* tables = [] {
    auto* t = new Tables;
    t->cp_to_byte.fill(-1);
    // Printable Latin-1 bytes stand for themselves; the others get U+0100 + n in byte order.
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable =
          (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const uint32_t cp = printable ? static_cast<uint32_t>(b) : next++;
      t->byte_to_cp[b] = cp;
      utf8::Append(cp, &t->byte_to_token[b]);
      t->cp_to_byte[cp] = static_cast<int16_t>(b);
    }
    return t;
  }();
  return *tables;
}

}  // namespace

uint32_t ByteToCodePoint(uint8_t b) { return GetTables().byte_to_cp[b]; }

const std::string& ByteToToken(uint8_t b) { return GetTables().byte_to_token[b]; }

int CodePointToByte(uint32_t code_point) {
  if (code_point >= 512) return -1;
  return GetTables().cp_to_byte[code_point];
}

std::string Encode(std::string_view bytes) {
  const Tables& t = GetTables();
  std::string out;
  out.reserve(bytes.size() * 2);
  for (char c : bytes) out += t.byte_to_token[static_cast<uint8_t>(c)];
  return out;
}

bool DecodeToken(std::string_view token, std::string* out) {
  std::vector<uint32_t> cps;
  std::vector<size_t> offsets;
  utf8::Decode(token, &cps, &offsets);
  out->clear();
  for (uint32_t cp : cps) {
    const int b = CodePointToByte(cp);
    if (b < 0) return false;
    out->push_back(static_cast<char>(b));
  }
  return true;
}

}  // namespace crossdiff::tokenizer::byte_level
