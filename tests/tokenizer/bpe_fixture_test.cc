// Golden test: the byte-level BPE fixture's ids and decoded text, as Hugging Face produced them
// (../shared/fixtures/tokenizers/bpe-gpt2/README.md), for both merge encodings of tokenizer.json.
#include <filesystem>
#include <string>
#include <vector>

#include "core/tokenizer/tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/tokenizer/test_support.h"

namespace crossdiff::tokenizer {
namespace {

using ::crossdiff::tokenizer::testing::BpeFixtureDir;
using ::crossdiff::tokenizer::testing::ReadText;
using ::crossdiff::tokenizer::testing::TempDir;
using ::crossdiff::tokenizer::testing::WriteText;
using ::testing::ElementsAreArray;

std::vector<nlohmann::json> ReadJsonl(const std::string& path) {
  std::vector<nlohmann::json> rows;
  std::string text = ReadText(path);
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    if (end > start) rows.push_back(nlohmann::json::parse(text.substr(start, end - start)));
    start = end + 1;
  }
  return rows;
}

// Copies the fixture's `tokenizer_file` as tokenizer.json (with tokenizer_config.json) into a temp
// dir.
class BpeFixtureTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    const std::string src = BpeFixtureDir();
    WriteText(dir_.File("tokenizer.json"), ReadText(src + "/" + GetParam()));
    WriteText(dir_.File("tokenizer_config.json"), ReadText(src + "/tokenizer_config.json"));
    auto loaded = Tokenizer::Load(dir_.path());
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    tokenizer_ = std::move(loaded).value();
  }
  TempDir dir_;
  std::unique_ptr<Tokenizer> tokenizer_;
};

TEST_P(BpeFixtureTest, EncodesEveryExpectedStringLikeHuggingFace) {
  const auto rows = ReadJsonl(BpeFixtureDir() + "/expected.jsonl");
  ASSERT_EQ(rows.size(), 96u);
  for (size_t i = 0; i < rows.size(); ++i) {
    const std::string text = rows[i]["text"];
    const std::vector<int32_t> expected = rows[i]["ids"];
    auto ids = tokenizer_->Encode(text, /*add_special=*/false);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_THAT(*ids, ElementsAreArray(expected))
        << "line " << i + 1 << ": " << rows[i]["text"].dump();
    // GPT-2 adds no BOS/EOS (add_bos_token false), so add_special changes nothing.
    auto with_special = tokenizer_->Encode(text, /*add_special=*/true);
    ASSERT_TRUE(with_special.ok());
    EXPECT_EQ(*with_special, *ids) << "line " << i + 1;
  }
}

TEST_P(BpeFixtureTest, DecodesEveryExpectedIdSequenceLikeHuggingFace) {
  for (const auto& row : ReadJsonl(BpeFixtureDir() + "/expected.jsonl")) {
    const std::vector<int32_t> ids = row["ids"];
    EXPECT_EQ(tokenizer_->Decode(ids), row["decoded"].get<std::string>()) << row["text"].dump();
  }
}

TEST_P(BpeFixtureTest, LossyDecodeOfInvalidUtf8MatchesHuggingFace) {
  const auto rows = ReadJsonl(BpeFixtureDir() + "/decode_only.jsonl");
  ASSERT_EQ(rows.size(), 11u);
  for (const auto& row : rows) {
    const std::vector<int32_t> ids = row["ids"];
    EXPECT_EQ(tokenizer_->Decode(ids), row["decoded"].get<std::string>()) << row["ids"].dump();
  }
}

TEST_P(BpeFixtureTest, VocabularyAndSpecialTokens) {
  EXPECT_EQ(tokenizer_->vocab_size(), 1759);
  EXPECT_EQ(tokenizer_->kind(), "bpe");
  EXPECT_EQ(tokenizer_->bos_token(), "<|endoftext|>");
  EXPECT_EQ(tokenizer_->bos_id(), 1756);
  EXPECT_EQ(tokenizer_->eos_id(), 1756);
  EXPECT_EQ(tokenizer_->pad_id(), std::nullopt);
  EXPECT_EQ(tokenizer_->TokenToId("<|im_start|>"), 1757);
  EXPECT_EQ(tokenizer_->TokenToId("Ġt"), 256);
  EXPECT_EQ(tokenizer_->TokenToId("no such token"), std::nullopt);
  EXPECT_EQ(tokenizer_->IdToToken(220), "Ġ");
  EXPECT_EQ(tokenizer_->IdToToken(1758), "<|im_end|>");
  EXPECT_EQ(tokenizer_->IdToToken(1759), std::nullopt);
  EXPECT_TRUE(tokenizer_->chat_template().empty());
}

INSTANTIATE_TEST_SUITE_P(MergeEncodings, BpeFixtureTest,
                         ::testing::Values("tokenizer.json", "tokenizer.merges_pairs.json"),
                         [](const auto& info) {
                           return info.param == "tokenizer.json" ? std::string("LegacyStringMerges")
                                                                 : std::string("PairMerges");
                         });

TEST(BpeFixtureFingerprintTest, SameForBothMergeEncodingsAndStable) {
  std::string fingerprints[2];
  int i = 0;
  for (const char* file : {"tokenizer.json", "tokenizer.merges_pairs.json"}) {
    TempDir dir;
    WriteText(dir.File("tokenizer.json"), ReadText(BpeFixtureDir() + "/" + file));
    WriteText(dir.File("tokenizer_config.json"),
              ReadText(BpeFixtureDir() + "/tokenizer_config.json"));
    auto tok = Tokenizer::Load(dir.path());
    ASSERT_TRUE(tok.ok()) << tok.status();
    fingerprints[i++] = (*tok)->Fingerprint();
  }
  EXPECT_EQ(fingerprints[0], fingerprints[1]);
  EXPECT_EQ(fingerprints[0].size(), 64u);
}

}  // namespace
}  // namespace crossdiff::tokenizer
