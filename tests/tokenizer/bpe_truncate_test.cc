// WriteTruncatedBpeTokenizer: the bpe-gpt2 fixture cut to 512 ids (what the 512-vocab demo models
// use).
#include "core/tokenizer/bpe_truncate.h"

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
using ::testing::HasSubstr;

std::vector<std::string> FixtureTexts() {
  std::vector<std::string> texts;
  const std::string all = ReadText(BpeFixtureDir() + "/expected.jsonl");
  size_t start = 0;
  while (start < all.size()) {
    size_t end = all.find('\n', start);
    if (end == std::string::npos) end = all.size();
    if (end > start) texts.push_back(nlohmann::json::parse(all.substr(start, end - start))["text"]);
    start = end + 1;
  }
  return texts;
}

TEST(BpeTruncateTest, KeepsIdsBelowLimitAndRoundTrips) {
  TempDir dst;
  ASSERT_TRUE(
      WriteTruncatedBpeTokenizer(BpeFixtureDir() + "/tokenizer.json", 512, dst.path()).ok());
  auto tok = Tokenizer::Load(dst.path());
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->vocab_size(), 512);
  // <|endoftext|> (1756) was dropped, so there is no BOS/EOS any more.
  EXPECT_EQ((*tok)->bos_id(), std::nullopt);
  EXPECT_EQ((*tok)->eos_id(), std::nullopt);
  auto full = Tokenizer::Load(BpeFixtureDir());
  ASSERT_TRUE(full.ok()) << full.status();
  EXPECT_NE((*tok)->Fingerprint(), (*full)->Fingerprint());
  size_t total_short = 0, total_full = 0;
  for (const std::string& text : FixtureTexts()) {
    auto ids = (*tok)->Encode(text, /*add_special=*/true);
    ASSERT_TRUE(ids.ok()) << ids.status();
    for (int32_t id : *ids) ASSERT_LT(id, 512) << text;
    // Added tokens that were dropped are tokenized as plain text, so every string round-trips.
    EXPECT_EQ((*tok)->Decode(*ids), text);
    total_short += ids->size();
    total_full += (*full)->Encode(text, false)->size();
  }
  EXPECT_GT(total_short, total_full);  // fewer merges, longer sequences
  // The first merges are shared: a text made of early merges encodes identically.
  EXPECT_EQ(*(*tok)->Encode(" the", false), *(*full)->Encode(" the", false));
}

TEST(BpeTruncateTest, ByteLimitIsTheMinimum) {
  TempDir dst;
  EXPECT_TRUE(
      WriteTruncatedBpeTokenizer(BpeFixtureDir() + "/tokenizer.merges_pairs.json", 256, dst.path())
          .ok());
  auto tok = Tokenizer::Load(dst.path());
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->vocab_size(), 256);
  EXPECT_EQ((*tok)->Encode("ab", false)->size(), 2u);
  const absl::Status too_small =
      WriteTruncatedBpeTokenizer(BpeFixtureDir() + "/tokenizer.json", 100, dst.path());
  EXPECT_EQ(too_small.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(too_small.message()), HasSubstr("vocab_size 100 < 256"));
}

TEST(BpeTruncateTest, MissingSourceIsNotFound) {
  TempDir dst;
  const absl::Status s = WriteTruncatedBpeTokenizer(dst.File("nope.json"), 512, dst.File("out"));
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(s.message()), HasSubstr("nope.json"));
}

}  // namespace
}  // namespace crossdiff::tokenizer
