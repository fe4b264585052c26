#include "core/tokenizer/spm_processor.h"

#include <sentencepiece_processor.h>

namespace crossdiff::tokenizer {

SpmProcessor::SpmProcessor() : sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {}
SpmProcessor::~SpmProcessor() = default;

bool SpmProcessor::LoadFromSerialized(const std::string& serialized, std::string* error) {
  const auto status = sp_->LoadFromSerializedProto(serialized);
  if (!status.ok()) *error = status.message();
  return status.ok();
}

bool SpmProcessor::Encode(std::string_view text, std::vector<int>* ids, std::string* error) const {
  const auto status = sp_->Encode(text, ids);
  if (!status.ok()) *error = status.message();
  return status.ok();
}

bool SpmProcessor::Decode(const std::vector<int>& ids, std::string* text) const {
  return sp_->Decode(ids, text).ok();
}
int SpmProcessor::piece_size() const { return sp_->GetPieceSize(); }
int SpmProcessor::PieceToId(std::string_view piece) const { return sp_->PieceToId(piece); }
const std::string& SpmProcessor::IdToPiece(int id) const { return sp_->IdToPiece(id); }
bool SpmProcessor::IsControl(int id) const { return sp_->IsControl(id); }
int SpmProcessor::bos_id() const { return sp_->bos_id(); }
int SpmProcessor::eos_id() const { return sp_->eos_id(); }
int SpmProcessor::pad_id() const { return sp_->pad_id(); }
int SpmProcessor::unk_id() const { return sp_->unk_id(); }
std::string SpmProcessor::SerializedModel() const { return sp_->serialized_model_proto(); }

}  // namespace crossdiff::tokenizer
