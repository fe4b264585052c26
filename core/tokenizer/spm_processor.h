// A thin wrapper around sentencepiece::SentencePieceProcessor with plain standard-library types.
// sentencepiece_processor.h declares its own `absl::string_view`, which collides with Debian's
// Abseil headers, so it is included only in spm_processor.cc (a translation unit without Abseil).
// Thread-safety: const methods are safe to call concurrently once loaded.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace crossdiff::tokenizer {

class SpmProcessor {
 public:
  SpmProcessor();
  ~SpmProcessor();
  // Returns false and sets *error when `serialized` is not a SentencePiece ModelProto.
  bool LoadFromSerialized(const std::string& serialized, std::string* error);
  bool Encode(std::string_view text, std::vector<int>* ids, std::string* error) const;
  bool Decode(const std::vector<int>& ids, std::string* text) const;
  int piece_size() const;
  int PieceToId(std::string_view piece) const;
  const std::string& IdToPiece(int id) const;
  bool IsControl(int id) const;
  int bos_id() const;
  int eos_id() const;
  int pad_id() const;
  int unk_id() const;
  std::string SerializedModel() const;

 private:
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
};

}  // namespace crossdiff::tokenizer
