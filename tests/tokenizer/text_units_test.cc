// The hand-written pre-tokenizer regexes, UTF-8 helpers, Unicode classes and SHA-256.
// Expected pieces were produced by Python's `regex` module (findall with the pattern strings quoted
// in core/tokenizer/pretokenizer_regex.h); during development the matchers also agreed with it on
// 120000 random strings over a tricky alphabet.
#include <string>
#include <vector>

#include "core/tokenizer/byte_level.h"
#include "core/tokenizer/nfc.h"
#include "core/tokenizer/pretokenizer_regex.h"
#include "core/tokenizer/sha256.h"
#include "core/tokenizer/unicode_tables.h"
#include "core/tokenizer/utf8.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace crossdiff::tokenizer {
namespace {

struct SplitCase {
  PreTokenizerPattern pattern;
  std::string text;
  std::vector<std::string> pieces;
};

const SplitCase kSplitCases[] = {
    {PreTokenizerPattern::kGpt2, "Hello world", {"Hello", " world"}},
    {PreTokenizerPattern::kGpt2,
     "I'M here, you'RE 12345 away",
     {"I", "'", "M", " here", ",", " you", "'", "RE", " 12345", " away"}},
    {PreTokenizerPattern::kGpt2,
     "  two  spaces\n\n  indent",
     {" ", " two", " ", " spaces", "\n\n ", " indent"}},
    {PreTokenizerPattern::kGpt2,
     "x = 1;\r\n\tif (x) {\n  y();\n}\n",
     {"x", " =", " 1", ";", "\r\n", "\t", "if", " (", "x", ")", " {", "\n ", " y", "();", "\n", "}",
      "\n"}},
    {PreTokenizerPattern::kGpt2,
     "e\u0301t\u00e9 \u00a0b \u3000c",
     {"e", "\u0301", "t\u00e9", " ", "\u00a0", "b", " ", "\u3000", "c"}},
    {PreTokenizerPattern::kGpt2,
     "price: $1,234.56!!",
     {"price", ":", " $", "1", ",", "234", ".", "56", "!!"}},
    {PreTokenizerPattern::kGpt2,
     "\u4e2d\u6587 \u0661\u0662\u0663\u0664",
     {"\u4e2d\u6587", " \u0661\u0662\u0663\u0664"}},
    {PreTokenizerPattern::kGpt2, "a\u200bb \ufeffc", {"a", "\u200b", "b", " \ufeff", "c"}},
    {PreTokenizerPattern::kGpt2, "tab\t\tend  ", {"tab", "\t", "\t", "end", "  "}},
    {PreTokenizerPattern::kGpt2, "'s's 'S \u2019s", {"'s", "'s", " '", "S", " \u2019", "s"}},
    {PreTokenizerPattern::kLlama3, "Hello world", {"Hello", " world"}},
    {PreTokenizerPattern::kLlama3,
     "I'M here, you'RE 12345 away",
     {"I", "'M", " here", ",", " you", "'RE", " ", "123", "45", " away"}},
    {PreTokenizerPattern::kLlama3,
     "  two  spaces\n\n  indent",
     {" ", " two", " ", " spaces", "\n\n", " ", " indent"}},
    {PreTokenizerPattern::kLlama3,
     "x = 1;\r\n\tif (x) {\n  y();\n}\n",
     {"x", " =", " ", "1", ";\r\n", "\tif", " (", "x", ")", " {\n", " ", " y", "();\n", "}\n"}},
    {PreTokenizerPattern::kLlama3,
     "e\u0301t\u00e9 \u00a0b \u3000c",
     {"e", "\u0301t\u00e9", " ", "\u00a0b", " ", "\u3000c"}},
    {PreTokenizerPattern::kLlama3,
     "price: $1,234.56!!",
     {"price", ":", " $", "1", ",", "234", ".", "56", "!!"}},
    {PreTokenizerPattern::kLlama3,
     "\u4e2d\u6587 \u0661\u0662\u0663\u0664",
     {"\u4e2d\u6587", " ", "\u0661\u0662\u0663", "\u0664"}},
    {PreTokenizerPattern::kLlama3, "a\u200bb \ufeffc", {"a", "\u200bb", " \ufeff", "c"}},
    {PreTokenizerPattern::kLlama3, "tab\t\tend  ", {"tab", "\t", "\tend", "  "}},
    {PreTokenizerPattern::kLlama3, "'s's 'S \u2019s", {"'s", "'s", " '", "S", " \u2019", "s"}},
    {PreTokenizerPattern::kQwen2, "Hello world", {"Hello", " world"}},
    {PreTokenizerPattern::kQwen2,
     "I'M here, you'RE 12345 away",
     {"I", "'M", " here", ",", " you", "'RE", " ", "1", "2", "3", "4", "5", " away"}},
    {PreTokenizerPattern::kQwen2,
     "  two  spaces\n\n  indent",
     {" ", " two", " ", " spaces", "\n\n", " ", " indent"}},
    {PreTokenizerPattern::kQwen2,
     "x = 1;\r\n\tif (x) {\n  y();\n}\n",
     {"x", " =", " ", "1", ";\r\n", "\tif", " (", "x", ")", " {\n", " ", " y", "();\n", "}\n"}},
    {PreTokenizerPattern::kQwen2,
     "e\u0301t\u00e9 \u00a0b \u3000c",
     {"e", "\u0301t\u00e9", " ", "\u00a0b", " ", "\u3000c"}},
    {PreTokenizerPattern::kQwen2,
     "price: $1,234.56!!",
     {"price", ":", " $", "1", ",", "2", "3", "4", ".", "5", "6", "!!"}},
    {PreTokenizerPattern::kQwen2,
     "\u4e2d\u6587 \u0661\u0662\u0663\u0664",
     {"\u4e2d\u6587", " ", "\u0661", "\u0662", "\u0663", "\u0664"}},
    {PreTokenizerPattern::kQwen2, "a\u200bb \ufeffc", {"a", "\u200bb", " \ufeff", "c"}},
    {PreTokenizerPattern::kQwen2, "tab\t\tend  ", {"tab", "\t", "\tend", "  "}},
    {PreTokenizerPattern::kQwen2, "'s's 'S \u2019s", {"'s", "'s", " '", "S", " \u2019", "s"}},
};

TEST(PreTokenizerRegexTest, PiecesMatchPythonRegex) {
  std::vector<std::string_view> pieces;
  for (const SplitCase& c : kSplitCases) {
    SplitPieces(c.pattern, c.text, &pieces);
    std::vector<std::string> got(pieces.begin(), pieces.end());
    EXPECT_EQ(got, c.pieces) << "pattern " << static_cast<int>(c.pattern) << " text '" << c.text
                             << "'";
  }
}

TEST(PreTokenizerRegexTest, InvalidUtf8BytesArePreservedAsOtherCharacters) {
  std::vector<std::string_view> pieces;
  const std::string text = "ab\xff\xfe cd\xc3";
  SplitPieces(PreTokenizerPattern::kGpt2, text, &pieces);
  std::vector<std::string> got(pieces.begin(), pieces.end());
  EXPECT_EQ(got, (std::vector<std::string>{"ab", "\xff\xfe", " cd", "\xc3"}));
}

TEST(PreTokenizerRegexTest, RecognizesTheKnownPatternsOnly) {
  EXPECT_EQ(RecognizeSplitRegex(
                R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)"),
            PreTokenizerPattern::kGpt2);
  EXPECT_EQ(
      RecognizeSplitRegex(R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|)"
                          R"( ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)"),
      PreTokenizerPattern::kLlama3);
  EXPECT_EQ(RecognizeSplitRegex(R"(\s+)"), std::nullopt);
}

TEST(UnicodeClassTest, FollowsWhiteSpacePropertyNotPythonIsspace) {
  using unicode::CharClass;
  using unicode::Classify;
  for (uint32_t cp :
       {0x20u, 0x09u, 0x0Du, 0x85u, 0xA0u, 0x1680u, 0x2000u, 0x200Au, 0x2028u, 0x202Fu, 0x3000u}) {
    EXPECT_EQ(Classify(cp), CharClass::kWhiteSpace) << cp;
  }
  for (uint32_t cp : {0x1Cu, 0x1Fu, 0x200Bu, 0xFEFFu})
    EXPECT_EQ(Classify(cp), CharClass::kOther) << cp;
  EXPECT_EQ(Classify('a'), CharClass::kLetter);
  EXPECT_EQ(Classify(0x4E2D), CharClass::kLetter);   // CJK
  EXPECT_EQ(Classify(0x20000), CharClass::kLetter);  // CJK Ext. B (above the BMP)
  EXPECT_EQ(Classify(0x0301), CharClass::kOther);    // combining mark (Mn)
  EXPECT_EQ(Classify(0x0661), CharClass::kNumber);   // Arabic-Indic digit
  EXPECT_EQ(Classify(0x216B), CharClass::kNumber);   // Roman numeral (Nl)
  EXPECT_EQ(Classify(0xBD), CharClass::kNumber);     // ½ (No)
  EXPECT_EQ(Classify(0x1F600), CharClass::kOther);   // emoji
  EXPECT_EQ(Classify(0x110041), CharClass::kOther);  // invalid-byte marker
}

TEST(Utf8Test, LossyDecodeReplacesEachMaximalSubpartOnce) {
  EXPECT_EQ(utf8::DecodeLossy("ok \xE2\x82\xAC"), "ok \xE2\x82\xAC");
  EXPECT_EQ(utf8::DecodeLossy("\xE2\x82"), "\xEF\xBF\xBD");              // truncated: one
  EXPECT_EQ(utf8::DecodeLossy("\x80\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD");  // two stray continuations
  EXPECT_EQ(utf8::DecodeLossy("\xF0\x9F\x98x"), "\xEF\xBF\xBDx");        // 3 of 4 bytes
  EXPECT_EQ(utf8::DecodeLossy("\xE0\x80"),
            "\xEF\xBF\xBD\xEF\xBF\xBD");  // overlong lead: E0 then 80
  EXPECT_EQ(utf8::DecodeLossy("\xED\xA0\x80"),
            "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // surrogate
  EXPECT_EQ(utf8::DecodeLossy("\xC0\xAF"), "\xEF\xBF\xBD\xEF\xBF\xBD");
}

TEST(ByteLevelTest, Gpt2ByteAlphabet) {
  EXPECT_EQ(byte_level::ByteToToken(' '), "\xC4\xA0");   // Ġ
  EXPECT_EQ(byte_level::ByteToToken('\n'), "\xC4\x8A");  // Ċ
  EXPECT_EQ(byte_level::ByteToToken('!'), "!");
  EXPECT_EQ(byte_level::ByteToCodePoint(0xAD), 0x143u);  // Ń
  std::string bytes;
  ASSERT_TRUE(byte_level::DecodeToken(byte_level::Encode("a b\xff"), &bytes));
  EXPECT_EQ(bytes, "a b\xff");
  EXPECT_FALSE(byte_level::DecodeToken("a b", &bytes));  // a raw space is not a byte character
}

// Expected forms from Python's unicodedata.normalize("NFC", ...) (Unicode 14); during development
// ToNfc also agreed with it on 33000 random strings of decomposable characters, combining marks and
// jamo.
TEST(NfcTest, ComposesReordersAndKeepsExclusions) {
  EXPECT_EQ(unicode::ToNfc("plain ASCII"), "plain ASCII");
  EXPECT_EQ(unicode::ToNfc("e\u0301"), "\u00e9");             // e + acute -> é
  EXPECT_EQ(unicode::ToNfc("a\u0323\u0302"), "\u1ead");       // ordering then composition
  EXPECT_EQ(unicode::ToNfc("a\u0302\u0323"), "\u1ead");       // reordered: dot below first
  EXPECT_EQ(unicode::ToNfc("\u212b"), "\u00c5");              // Angstrom sign (singleton)
  EXPECT_EQ(unicode::ToNfc("\u0958"), "\u0915\u093c");        // composition exclusion
  EXPECT_EQ(unicode::ToNfc("\u1100\u1161\u11a8"), "\uac01");  // Hangul L V T
  EXPECT_EQ(unicode::ToNfc("\uac00\u11a8"), "\uac01");        // Hangul LV + T
  EXPECT_EQ(unicode::ToNfc("\u0344"), "\u0308\u0301");        // non-starter decomposition
  EXPECT_EQ(unicode::ToNfc("x\xff\u0301"),
            "x\xff\u0301");  // invalid byte blocks nothing, composes with nothing
}

TEST(Sha256Test, KnownVectors) {
  Sha256 empty;
  EXPECT_EQ(empty.HexDigest(), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  Sha256 abc;
  abc.Update("abc");
  EXPECT_EQ(abc.HexDigest(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  Sha256 million;
  const std::string chunk(1000, 'a');
  for (int i = 0; i < 1000; ++i) million.Update(chunk);
  EXPECT_EQ(million.HexDigest(),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

}  // namespace
}  // namespace crossdiff::tokenizer
