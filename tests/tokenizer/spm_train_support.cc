#include <cstdlib>
#include <string>

#include "tests/tokenizer/test_support.h"

namespace crossdiff::tokenizer::testing {

// Trains with Debian's `spm_train` in its own process (package `sentencepiece`), so the test binary
// never has SentencePiece's trainer in it: only the plugin's processor, as in the product.
std::string TrainSentencePiece(const std::string& corpus_file, const std::string& model_prefix,
                               const std::string& model_type, int vocab_size) {
  const std::string cmd = "spm_train --input=" + corpus_file + " --model_prefix=" + model_prefix +
                          " --model_type=" + model_type +
                          " --vocab_size=" + std::to_string(vocab_size) +
                          " --character_coverage=1.0 --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=3"
                          " '--user_defined_symbols=<start_of_turn>,<end_of_turn>'"
                          " --minloglevel=2 --num_threads=1 > " + model_prefix + ".log 2>&1";
  const int rc = std::system(cmd.c_str());
  return rc == 0 ? std::string() : "spm_train failed (see " + model_prefix + ".log): " + cmd;
}

}  // namespace crossdiff::tokenizer::testing
