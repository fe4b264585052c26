// Helpers shared by the tokenizer tests: temporary directories, fixture paths, a SentencePiece
// trainer.
#pragma once

#include <string>

namespace crossdiff::tokenizer::testing {

// $CROSSDIFF_FIXTURES/tokenizers/bpe-gpt2 (or the source tree's ../shared/fixtures when unset).
std::string BpeFixtureDir();

// A fresh empty directory, removed when the object goes out of scope.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

void WriteText(const std::string& path, const std::string& text);
std::string ReadText(const std::string& path);

// Trains a small SentencePiece model on `corpus_file` with libsentencepiece_train and writes
// `model_prefix`.model. Returns "" on success, else the trainer's error. Lives in its own
// translation unit because sentencepiece headers clash with Abseil's.
std::string TrainSentencePiece(const std::string& corpus_file, const std::string& model_prefix,
                               const std::string& model_type, int vocab_size);

}  // namespace crossdiff::tokenizer::testing
