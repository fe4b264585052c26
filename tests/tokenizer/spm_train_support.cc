// No Abseil headers in this file: sentencepiece_trainer.h declares its own absl::string_view.
#include <sentencepiece_trainer.h>

#include "tests/tokenizer/test_support.h"

namespace crossdiff::tokenizer::testing {

std::string TrainSentencePiece(const std::string& corpus_file, const std::string& model_prefix,
                               const std::string& model_type, int vocab_size) {
  const std::string args = "--input=" + corpus_file + " --model_prefix=" + model_prefix +
                           " --model_type=" + model_type +
                           " --vocab_size=" + std::to_string(vocab_size) +
                           " --character_coverage=1.0 --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=3"
                           " --user_defined_symbols=<start_of_turn>,<end_of_turn>"
                           " --minloglevel=2 --num_threads=1";
  const auto status = sentencepiece::SentencePieceTrainer::Train(args);
  return status.ok() ? std::string() : std::string(status.message());
}

}  // namespace crossdiff::tokenizer::testing
