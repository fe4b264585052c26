// libcrossdiff_spm.so: see spm_plugin.h. No Abseil headers here: sentencepiece's headers declare
// their own absl::string_view.
#include "core/tokenizer/spm_plugin.h"

#include <sentencepiece_processor.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

sentencepiece::SentencePieceProcessor* Sp(void* sp) {
  return static_cast<sentencepiece::SentencePieceProcessor*>(sp);
}

char* Copy(const std::string& s, size_t* size = nullptr) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (out == nullptr) return nullptr;
  std::memcpy(out, s.data(), s.size());
  out[s.size()] = '\0';
  if (size != nullptr) *size = s.size();
  return out;
}

}  // namespace

extern "C" {

void* cdspm_new() { return new sentencepiece::SentencePieceProcessor(); }
void cdspm_delete(void* sp) { delete Sp(sp); }

int cdspm_load(void* sp, const char* data, size_t size, char** error) {
  const auto status = Sp(sp)->LoadFromSerializedProto(std::string(data, size));
  if (!status.ok()) *error = Copy(status.message());
  return status.ok() ? 1 : 0;
}

int cdspm_encode(void* sp, const char* text, size_t size, int** ids, size_t* count, char** error) {
  std::vector<int> out;
  const auto status = Sp(sp)->Encode(std::string(text, size), &out);
  if (!status.ok()) {
    *error = Copy(status.message());
    return 0;
  }
  *ids = static_cast<int*>(std::malloc(sizeof(int) * (out.empty() ? 1 : out.size())));
  if (!out.empty()) std::memcpy(*ids, out.data(), sizeof(int) * out.size());
  *count = out.size();
  return 1;
}

int cdspm_decode(void* sp, const int* ids, size_t count, char** text, size_t* size) {
  std::string out;
  if (!Sp(sp)->Decode(std::vector<int>(ids, ids + count), &out).ok()) return 0;
  *text = Copy(out, size);
  return 1;
}

int cdspm_piece_size(void* sp) { return Sp(sp)->GetPieceSize(); }
int cdspm_piece_to_id(void* sp, const char* piece, size_t size) {
  return Sp(sp)->PieceToId(std::string(piece, size));
}
const char* cdspm_id_to_piece(void* sp, int id, size_t* size) {
  const std::string& p = Sp(sp)->IdToPiece(id);
  *size = p.size();
  return p.data();
}
int cdspm_is_control(void* sp, int id) { return Sp(sp)->IsControl(id) ? 1 : 0; }
int cdspm_special_id(void* sp, int which) {
  switch (which) {
    case 0: return Sp(sp)->bos_id();
    case 1: return Sp(sp)->eos_id();
    case 2: return Sp(sp)->pad_id();
    default: return Sp(sp)->unk_id();
  }
}
char* cdspm_serialized(void* sp, size_t* size) { return Copy(Sp(sp)->serialized_model_proto(), size); }

void cdspm_free_buffer(void* buffer) { std::free(buffer); }

}  // extern "C"
