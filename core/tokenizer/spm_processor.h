// A thin wrapper around sentencepiece::SentencePieceProcessor with plain standard-library types.
// SentencePiece itself lives in the plugin libcrossdiff_spm.so (spm_plugin.h explains why), loaded
// on first use from: $CROSSDIFF_SPM_PLUGIN, beside the executable, ../lib beside it, the build
// directory, then the loader's search path.
// Thread-safety: const methods are safe to call concurrently once loaded.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

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
  void* sp_ = nullptr;                // the plugin's processor
  std::vector<std::string> pieces_;   // id -> piece, filled at load
};

}  // namespace crossdiff::tokenizer
