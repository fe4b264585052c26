// SHA-256 (FIPS 180-4), used for tokenizer fingerprints. Not thread-safe per object; create one per
// hash.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

namespace crossdiff::tokenizer {

class Sha256 {
 public:
  Sha256();
  void Update(std::string_view data);
  // Convenience: a length-prefixed field, so that ("ab","c") and ("a","bc") hash differently.
  void UpdateField(std::string_view data);
  // Finishes the hash and returns it as 64 lowercase hex digits. The object must not be used
  // afterwards.
  std::string HexDigest();

 private:
  void Block(const uint8_t* p);
  std::array<uint32_t, 8> h_;
  uint8_t buffer_[64];
  size_t buffered_ = 0;
  uint64_t total_bytes_ = 0;
};

}  // namespace crossdiff::tokenizer
