// SentencePiece tokenizer.model support: a small model trained at test time with
// libsentencepiece_train.
#include <algorithm>
#include <filesystem>
#include <string>
#include <vector>

#include "core/tokenizer/tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/tokenizer/test_support.h"

namespace crossdiff::tokenizer {
namespace {

using ::crossdiff::tokenizer::testing::ReadText;
using ::crossdiff::tokenizer::testing::TempDir;
using ::crossdiff::tokenizer::testing::TrainSentencePiece;
using ::crossdiff::tokenizer::testing::WriteText;
using ::testing::HasSubstr;

// Trains one BPE-type SentencePiece model (ids: 0 unk, 1 <s>, 2 </s>, 3 <pad>, then the
// user-defined <start_of_turn>, <end_of_turn>) once for the whole suite.
class SentencePieceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    corpus_dir_ = new TempDir();
    std::string corpus;
    const char* words[] = {"the",  "quick", "brown", "fox",   "jumps",     "over",
                           "lazy", "dog",   "model", "token", "crossdiff", "latent",
                           "base", "chat",  "über",  "café",  "日本",      "語"};
    for (int line = 0; line < 400; ++line) {
      for (int w = 0; w < 9; ++w)
        corpus += std::string(words[(line * 7 + w * 3) % 18]) + (w < 8 ? " " : "\n");
    }
    WriteText(corpus_dir_->File("corpus.txt"), corpus);
    error_ = new std::string(
        TrainSentencePiece(corpus_dir_->File("corpus.txt"), corpus_dir_->File("spm"), "bpe", 120));
  }
  static void TearDownTestSuite() {
    delete corpus_dir_;
    delete error_;
  }
  void SetUp() override {
    ASSERT_TRUE(error_->empty()) << *error_;
    WriteText(dir_.File("tokenizer.model"), ReadText(corpus_dir_->File("spm.model")));
  }
  std::unique_ptr<Tokenizer> LoadOrDie() {
    auto tok = Tokenizer::Load(dir_.path());
    EXPECT_TRUE(tok.ok()) << tok.status();
    return tok.ok() ? std::move(tok).value() : nullptr;
  }

  static TempDir* corpus_dir_;
  static std::string* error_;
  TempDir dir_;
};
TempDir* SentencePieceTest::corpus_dir_ = nullptr;
std::string* SentencePieceTest::error_ = nullptr;

TEST_F(SentencePieceTest, RoundTripAndDefaultBos) {
  auto tok = LoadOrDie();
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->kind(), "sentencepiece");
  EXPECT_EQ(tok->vocab_size(), 120);
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_id(), 2);
  EXPECT_EQ(tok->pad_id(), 3);
  const std::string text = "the lazy crossdiff model über café 日本語";
  auto plain = tok->Encode(text, false);
  ASSERT_TRUE(plain.ok()) << plain.status();
  ASSERT_FALSE(plain->empty());
  for (int32_t id : *plain) {
    EXPECT_GE(id, 0);
    EXPECT_LT(id, 120);
  }
  EXPECT_EQ(tok->Decode(*plain), text);
  // Without tokenizer_config.json, SentencePiece models add BOS (LlamaTokenizer / GemmaTokenizer
  // default).
  auto special = tok->Encode(text, true);
  ASSERT_TRUE(special.ok());
  ASSERT_EQ(special->size(), plain->size() + 1);
  EXPECT_EQ((*special)[0], 1);
  EXPECT_EQ(std::vector<int32_t>(special->begin() + 1, special->end()), *plain);
  EXPECT_EQ(tok->Decode(*special), "<s>" + text);
}

TEST_F(SentencePieceTest, ConfigControlsBosAndEos) {
  WriteText(
      dir_.File("tokenizer_config.json"),
      R"({"add_bos_token": false, "add_eos_token": true, "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{{ bos_token }}{% for m in messages %}<start_of_turn>{% endfor %}"
      })");
  auto tok = LoadOrDie();
  ASSERT_NE(tok, nullptr);
  auto ids = tok->Encode("the fox", true);
  ASSERT_TRUE(ids.ok());
  EXPECT_NE(ids->front(), 1);
  EXPECT_EQ(ids->back(), 2);
  EXPECT_EQ(tok->chat_template(),
            "{{ bos_token }}{% for m in messages %}<start_of_turn>{% endfor %}");
  EXPECT_EQ(tok->TokenToId("<start_of_turn>"), 4);
  EXPECT_EQ(tok->TokenToId("<no such piece>"), std::nullopt);
}

TEST_F(SentencePieceTest, UserDefinedSymbolsInTextMapToTheirIds) {
  auto tok = LoadOrDie();
  ASSERT_NE(tok, nullptr);
  auto ids = tok->Encode("<start_of_turn>the dog<end_of_turn>", false);
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(std::count(ids->begin(), ids->end(), 4), 1);
  EXPECT_EQ(std::count(ids->begin(), ids->end(), 5), 1);
  EXPECT_EQ(tok->Decode(*ids), "<start_of_turn>the dog<end_of_turn>");
}

TEST_F(SentencePieceTest, FingerprintFollowsModelAndBosPolicy) {
  auto a = LoadOrDie();
  auto b = LoadOrDie();
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->Fingerprint(), b->Fingerprint());
  WriteText(dir_.File("tokenizer_config.json"), R"({"add_bos_token": false})");
  auto c = LoadOrDie();
  ASSERT_NE(c, nullptr);
  EXPECT_NE(a->Fingerprint(), c->Fingerprint());
}

// Gemma / Llama-2 ship a SentencePiece-style tokenizer.json next to tokenizer.model: the model file
// is used.
TEST_F(SentencePieceTest, NonByteLevelTokenizerJsonFallsBackToTokenizerModel) {
  WriteText(dir_.File("tokenizer.json"),
            R"({"version": "1.0", "added_tokens": [], "normalizer": {"type": "Replace"},
                "pre_tokenizer": null, "model": {"type": "BPE", "vocab": {}, "merges": [],
                  "byte_fallback": true}})");
  auto tok = LoadOrDie();
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->kind(), "sentencepiece");
}

TEST_F(SentencePieceTest, CorruptModelFileNamesTheFile) {
  WriteText(dir_.File("tokenizer.model"), "this is not a protobuf");
  auto tok = Tokenizer::Load(dir_.path());
  ASSERT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(tok.status().message()),
              HasSubstr("tokenizer.model: not a SentencePiece model"));
}

}  // namespace
}  // namespace crossdiff::tokenizer
