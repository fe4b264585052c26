// Byte-level BPE beyond the golden fixture: BOS/EOS policy, TemplateProcessing, Llama-3 style Split
// pre-tokenizer, added-token flags, thread safety, and malformed input.
#include <thread>
#include <vector>

#include "core/tokenizer/pretokenizer_regex.h"
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
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using Json = nlohmann::ordered_json;

constexpr char kLlama3Regex[] =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|)"
    R"( ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

Json FixtureJson(const std::string& file) {
  return Json::parse(ReadText(BpeFixtureDir() + "/" + file));
}

// Writes a model directory with the given tokenizer.json and (optional) tokenizer_config.json,
// loads it.
std::unique_ptr<Tokenizer> LoadOrDie(const TempDir& dir, const Json& tokenizer_json,
                                     const Json* config) {
  WriteText(dir.File("tokenizer.json"), tokenizer_json.dump(2));
  if (config != nullptr) WriteText(dir.File("tokenizer_config.json"), config->dump(2));
  auto tok = Tokenizer::Load(dir.path());
  EXPECT_TRUE(tok.ok()) << tok.status();
  return tok.ok() ? std::move(tok).value() : nullptr;
}

std::vector<int32_t> EncodeOrDie(const Tokenizer& tok, std::string_view text, bool add_special) {
  auto ids = tok.Encode(text, add_special);
  EXPECT_TRUE(ids.ok()) << ids.status();
  return ids.ok() ? *ids : std::vector<int32_t>{};
}

TEST(BpeConfigTest, AddBosTokenFromTokenizerConfig) {
  TempDir dir;
  Json config = FixtureJson("tokenizer_config.json");
  config["add_bos_token"] = true;
  auto tok = LoadOrDie(dir, FixtureJson("tokenizer.json"), &config);
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(EncodeOrDie(*tok, "Hello world", true),
              ElementsAre(1756, 39, 68, 353, 78, 1417, 520));
  EXPECT_THAT(EncodeOrDie(*tok, "Hello world", false), ElementsAre(39, 68, 353, 78, 1417, 520));
  EXPECT_TRUE(tok->special_tokens().add_bos);
  EXPECT_FALSE(tok->special_tokens().add_eos);
  EXPECT_EQ(tok->Decode({1756, 39, 68, 353, 78, 1417, 520}), "<|endoftext|>Hello world");
}

TEST(BpeConfigTest, AddEosTokenFromTokenizerConfig) {
  TempDir dir;
  Json config = FixtureJson("tokenizer_config.json");
  config["add_eos_token"] = true;
  config["eos_token"] = "<|im_end|>";
  auto tok = LoadOrDie(dir, FixtureJson("tokenizer.json"), &config);
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(EncodeOrDie(*tok, "Hello world", true),
              ElementsAre(39, 68, 353, 78, 1417, 520, 1758));
  EXPECT_EQ(tok->eos_id(), 1758);
}

TEST(BpeConfigTest, TemplateProcessingAddsBosOnlyWithAddSpecial) {
  TempDir dir;
  Json tj = FixtureJson("tokenizer.json");
  // Llama-3 style: Sequence [ByteLevel, TemplateProcessing "<bos> $A"]; no tokenizer_config.json.
  tj["post_processor"] = Json::parse(R"({"type": "Sequence", "processors": [
      {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
      {"type": "TemplateProcessing",
       "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
         {"Sequence": {"id": "A", "type_id": 0}}],
       "pair": [],
       "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [1756],
         "tokens": ["<|endoftext|>"]}}}]})");
  auto tok = LoadOrDie(dir, tj, nullptr);
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(EncodeOrDie(*tok, "Hello world", true),
              ElementsAre(1756, 39, 68, 353, 78, 1417, 520));
  EXPECT_THAT(EncodeOrDie(*tok, "Hello world", false), ElementsAre(39, 68, 353, 78, 1417, 520));
  EXPECT_EQ(tok->bos_id(), 1756);
  EXPECT_TRUE(tok->bos_token().empty());  // no config: the id comes from the template
}

TEST(BpeConfigTest, ExplicitAddBosFalseOverridesTemplate) {
  TempDir dir;
  Json tj = FixtureJson("tokenizer.json");
  tj["post_processor"] = Json::parse(R"({"type": "TemplateProcessing",
       "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
         {"Sequence": {"id": "A", "type_id": 0}}],
       "pair": [], "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [1756],
         "tokens": ["<|endoftext|>"]}}})");
  Json config = FixtureJson("tokenizer_config.json");  // add_bos_token: false
  auto tok = LoadOrDie(dir, tj, &config);
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(EncodeOrDie(*tok, "Hello world", true), ElementsAre(39, 68, 353, 78, 1417, 520));
}

// With the Llama-3 Split regex + ByteLevel(use_regex=false), the ids are the BPE of each Split
// piece.
TEST(BpeConfigTest, Llama3SplitPreTokenizerFeedsEachPieceToBpe) {
  TempDir llama_dir, whole_dir;
  Json llama = FixtureJson("tokenizer.json");
  llama["pre_tokenizer"] = Json::parse(R"({"type": "Sequence", "pretokenizers": [
      {"type": "Split", "pattern": {"Regex": ""}, "behavior": "Isolated", "invert": false},
      {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
        "use_regex": false}]})");
  llama["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = kLlama3Regex;
  Json whole = FixtureJson("tokenizer.json");  // no regex: every segment is one BPE word
  whole["pre_tokenizer"] =
      Json::parse(R"({"type": "ByteLevel", "add_prefix_space": false, "use_regex": false})");
  auto llama_tok = LoadOrDie(llama_dir, llama, nullptr);
  auto whole_tok = LoadOrDie(whole_dir, whole, nullptr);
  ASSERT_NE(llama_tok, nullptr);
  ASSERT_NE(whole_tok, nullptr);
  EXPECT_NE(llama_tok->Fingerprint(), whole_tok->Fingerprint());
  for (const std::string text : {"I'M here, you'RE 12345 away", "x = 1;\r\n\tif (x) {\n  y();\n}\n",
                                 "  two  spaces\n\n  indent", "The quick brown fox"}) {
    std::vector<std::string_view> pieces;
    SplitPieces(PreTokenizerPattern::kLlama3, text, &pieces);
    std::vector<int32_t> expected;
    for (std::string_view piece : pieces) {
      const auto ids = EncodeOrDie(*whole_tok, piece, false);
      expected.insert(expected.end(), ids.begin(), ids.end());
    }
    EXPECT_EQ(EncodeOrDie(*llama_tok, text, false), expected) << text;
    EXPECT_EQ(llama_tok->Decode(expected), text);
  }
}

// Qwen2 style: NFC normalizer + the Qwen2 Split regex (one digit per piece).
TEST(BpeConfigTest, Qwen2NfcNormalizerAndSingleDigitPieces) {
  TempDir dir;
  Json tj = FixtureJson("tokenizer.json");
  tj["normalizer"] = Json::parse(R"({"type": "NFC"})");
  std::string regex = kLlama3Regex;
  regex.replace(regex.find("{1,3}"), 5, "");
  tj["pre_tokenizer"] = Json::parse(R"({"type": "Sequence", "pretokenizers": [
      {"type": "Split", "pattern": {"Regex": ""}, "behavior": "Isolated", "invert": false},
      {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false,
        "use_regex": false}]})");
  tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = regex;
  auto tok = LoadOrDie(dir, tj, nullptr);
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(EncodeOrDie(*tok, "caf\u00e9 <|im_start|>", false),
            EncodeOrDie(*tok, "cafe\u0301 <|im_start|>", false));
  EXPECT_EQ(tok->Decode(EncodeOrDie(*tok, "cafe\u0301", false)), "caf\u00e9");
  const auto digits = EncodeOrDie(*tok, "2024", false);
  EXPECT_EQ(digits.size(), 4u);
}

TEST(BpeConfigTest, IgnoreMergesUsesWholeWordVocabularyEntries) {
  TempDir dir;
  Json tj = FixtureJson("tokenizer.json");
  tj["model"]["ignore_merges"] = true;
  // A whole-word entry no merge sequence would produce: with ignore_merges it is used directly.
  tj["model"]["vocab"]["xyzzy"] = 1756;
  tj["model"]["vocab"].erase("<|endoftext|>");
  tj["added_tokens"].erase(0);
  auto tok = LoadOrDie(dir, tj, nullptr);
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(EncodeOrDie(*tok, "xyzzy", false), ElementsAre(1756));
}

TEST(BpeConfigTest, AddedTokenStripAndSingleWordFlags) {
  TempDir dir;
  Json tj = FixtureJson("tokenizer.json");
  tj["added_tokens"].push_back(Json::parse(
      R"({"id": 1759, "content": "<mask>", "single_word": false, "lstrip": true, "rstrip": true,
        "normalized": false, "special": true})"));
  tj["added_tokens"].push_back(Json::parse(
      R"({"id": 1760, "content": "zz", "single_word": true, "lstrip": false, "rstrip": false,
        "normalized": false, "special": false})"));
  auto tok = LoadOrDie(dir, tj, nullptr);
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->vocab_size(), 1761);
  std::vector<int32_t> expected = EncodeOrDie(*tok, "a", false);
  expected.push_back(1759);
  const auto b = EncodeOrDie(*tok, "b", false);
  expected.insert(expected.end(), b.begin(), b.end());
  // The spaces on both sides of <mask> belong to it.
  EXPECT_EQ(EncodeOrDie(*tok, "a  <mask>  b", false), expected);
  // single_word: "zz" only as a whole word.
  EXPECT_THAT(EncodeOrDie(*tok, "zz", false), ElementsAre(1760));
  const auto inside = EncodeOrDie(*tok, "azz", false);
  EXPECT_EQ(std::count(inside.begin(), inside.end(), 1760), 0);
}

TEST(BpeConfigTest, ChatTemplateAndSpecialTokenStringsFromConfig) {
  TempDir dir;
  Json config = FixtureJson("tokenizer_config.json");
  config["chat_template"] = "{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}";
  config["pad_token"] = {{"content", "<|im_end|>"}, {"lstrip", false}};
  auto tok = LoadOrDie(dir, FixtureJson("tokenizer.json"), &config);
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->chat_template(), "{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}");
  EXPECT_EQ(tok->pad_token(), "<|im_end|>");
  EXPECT_EQ(tok->pad_id(), 1758);
}

TEST(BpeConfigTest, ConcurrentEncodeAndDecodeAgree) {
  TempDir dir;
  Json config = FixtureJson("tokenizer_config.json");
  auto tok = LoadOrDie(dir, FixtureJson("tokenizer.json"), &config);
  ASSERT_NE(tok, nullptr);
  const std::vector<std::string> texts = {
      "Hello world", "The quick brown fox jumps over the lazy dog.",
      "<|im_start|>user\nHi<|im_end|>", "  indented\n\tcode();"};
  std::vector<std::vector<int32_t>> expected;
  for (const auto& t : texts) expected.push_back(EncodeOrDie(*tok, t, false));
  std::vector<std::thread> threads;
  std::vector<int> failures(8, 0);
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 200; ++round) {
        for (size_t i = 0; i < texts.size(); ++i) {
          auto ids = tok->Encode(texts[i] + std::to_string(round % 17), false);
          auto base = tok->Encode(texts[i], false);
          if (!ids.ok() || !base.ok() || *base != expected[i] ||
              tok->Decode(*ids) != texts[i] + std::to_string(round % 17)) {
            ++failures[t];
          }
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int f : failures) EXPECT_EQ(f, 0);
}

// ---- bad input ----

TEST(BpeLoadErrorTest, MalformedJsonNamesTheFile) {
  TempDir dir;
  WriteText(dir.File("tokenizer.json"),
            ReadText(BpeFixtureDir() + "/tokenizer.json").substr(0, 5000));
  auto tok = Tokenizer::Load(dir.path());
  ASSERT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(tok.status().message()),
              HasSubstr(dir.File("tokenizer.json") + ": malformed JSON"));
}

TEST(BpeLoadErrorTest, MergeWithUnknownTokenNamesTheMerge) {
  TempDir dir;
  Json tj = FixtureJson("tokenizer.json");
  tj["model"]["merges"][3] = "Ġ notatoken";
  WriteText(dir.File("tokenizer.json"), tj.dump());
  auto tok = Tokenizer::Load(dir.path());
  ASSERT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(tok.status().message()), HasSubstr("model.merges[3]"));
}

TEST(BpeLoadErrorTest, MalformedMergeEntry) {
  TempDir dir;
  Json tj = FixtureJson("tokenizer.json");
  tj["model"]["merges"][0] = 42;
  WriteText(dir.File("tokenizer.json"), tj.dump());
  auto tok = Tokenizer::Load(dir.path());
  ASSERT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(tok.status().message()), HasSubstr("model.merges[0]"));
}

TEST(BpeLoadErrorTest, UnknownSplitRegexIsUnimplementedAndNamed) {
  TempDir dir;
  Json tj = FixtureJson("tokenizer.json");
  tj["pre_tokenizer"] = Json::parse(R"({"type": "Sequence", "pretokenizers": [
      {"type": "Split", "pattern": {"Regex": "\\w+"}, "behavior": "Isolated", "invert": false},
      {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
        "use_regex": false}]})");
  WriteText(dir.File("tokenizer.json"), tj.dump());
  auto tok = Tokenizer::Load(dir.path());
  ASSERT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(std::string(tok.status().message()),
              HasSubstr("pre_tokenizer.pretokenizers[0].pattern.Regex"));
}

TEST(BpeLoadErrorTest, MalformedTokenizerConfigNamesTheFile) {
  TempDir dir;
  WriteText(dir.File("tokenizer.json"), ReadText(BpeFixtureDir() + "/tokenizer.json"));
  WriteText(dir.File("tokenizer_config.json"), R"({"add_bos_token": "yes"})");
  auto tok = Tokenizer::Load(dir.path());
  ASSERT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(tok.status().message()),
              HasSubstr("tokenizer_config.json: field 'add_bos_token'"));
}

TEST(BpeLoadErrorTest, AddBosWithUnknownBosToken) {
  TempDir dir;
  WriteText(dir.File("tokenizer.json"), ReadText(BpeFixtureDir() + "/tokenizer.json"));
  WriteText(dir.File("tokenizer_config.json"), R"({"add_bos_token": true, "bos_token": "<s>"})");
  auto tok = Tokenizer::Load(dir.path());
  ASSERT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(tok.status().message()), HasSubstr("bos_token '<s>'"));
}

TEST(BpeLoadErrorTest, DirectoryWithoutTokenizerIsNotFound) {
  TempDir dir;
  WriteText(dir.File("config.json"), "{}");
  auto tok = Tokenizer::Load(dir.path());
  ASSERT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(tok.status().message()), HasSubstr("no tokenizer"));
  auto missing = Tokenizer::Load(dir.File("does-not-exist"));
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace crossdiff::tokenizer
