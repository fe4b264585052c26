#include "core/data/dataset.h"

#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "core/data/sequence_range.h"
#include "core/tensor_io/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/data/test_encoder.h"

namespace crossdiff::data {
namespace {

namespace fs = std::filesystem;
using testing::ByteEncoder;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::string TempPath(const std::string& name) {
  fs::path dir = fs::path(::testing::TempDir()) / "crossdiff_data_test";
  fs::create_directories(dir);
  return (dir / name).string();
}

std::string WriteFile(const std::string& name, const std::string& contents) {
  std::string path = TempPath(name);
  std::ofstream(path, std::ios::binary) << contents;
  return path;
}

std::vector<TokenSequence> ReadAll(const DatasetOptions& options, const TextEncoder& encoder,
                                   SequenceRange range = {}) {
  auto reader = OpenSequenceReader(options, encoder, range);
  EXPECT_TRUE(reader.ok()) << reader.status();
  std::vector<TokenSequence> out;
  if (!reader.ok()) return out;
  TokenSequence s;
  while (true) {
    auto more = (*reader)->Next(&s);
    EXPECT_TRUE(more.ok()) << more.status();
    if (!more.ok() || !*more) break;
    out.push_back(s);
  }
  return out;
}

absl::Status DrainError(const DatasetOptions& options, const TextEncoder& encoder) {
  auto reader = OpenSequenceReader(options, encoder);
  if (!reader.ok()) return reader.status();
  TokenSequence s;
  while (true) {
    auto more = (*reader)->Next(&s);
    if (!more.ok()) return more.status();
    if (!*more) return absl::OkStatus();
  }
}

constexpr int32_t A = 'a' + 3;  // the byte encoder's id of 'a'

TEST(DatasetTest, PacksTextWithBosAndEosSeparators) {
  DatasetOptions o;
  o.path =
      WriteFile("pack.jsonl", "{\"text\": \"ab\"}\n\n{\"text\": \"cde\"}\n{\"text\": \"f\"}\n");
  o.format = DataFormat::kText;
  o.seq_len = 4;
  auto seqs = ReadAll(o, ByteEncoder());
  // Stream: a b EOS c d e EOS f; each sequence = BOS + 3 stream tokens; the last one is shorter.
  ASSERT_EQ(seqs.size(), 3u);
  EXPECT_THAT(seqs[0].token_ids, ElementsAre(1, A, A + 1, 2));
  EXPECT_THAT(seqs[1].token_ids, ElementsAre(1, A + 2, A + 3, A + 4));
  EXPECT_THAT(seqs[2].token_ids, ElementsAre(1, 2, A + 5));
  for (int i = 0; i < 3; ++i) EXPECT_EQ(seqs[i].sequence_id, i);
  EXPECT_THAT(seqs[2].attention, ElementsAre(1, 1, 1));
  EXPECT_THAT(seqs[2].stored, ElementsAre(1, 1, 1));
  EXPECT_EQ(*CountSequences(o, ByteEncoder()), 3);
}

TEST(DatasetTest, PacksWithoutSpecialTokensWhenTokenizerHasNone) {
  DatasetOptions o;
  o.path = WriteFile("pack_plain.jsonl", "{\"text\": \"ab\"}\n{\"text\": \"cde\"}\n");
  o.seq_len = 3;
  auto seqs = ReadAll(o, ByteEncoder(/*with_bos=*/false, /*with_eos=*/false));
  ASSERT_EQ(seqs.size(), 2u);
  EXPECT_THAT(seqs[0].token_ids, ElementsAre(A, A + 1, A + 2));
  EXPECT_THAT(seqs[1].token_ids, ElementsAre(A + 3, A + 4));
}

TEST(DatasetTest, SkipFirstMarksLeadingTokensNotStored) {
  DatasetOptions o;
  o.path = WriteFile("skip.jsonl", "{\"text\": \"abcdefg\"}\n");
  o.seq_len = 4;
  o.skip_first = 2;
  auto seqs = ReadAll(o, ByteEncoder());
  ASSERT_EQ(seqs.size(), 3u);
  EXPECT_THAT(seqs[0].stored, ElementsAre(0, 0, 1, 1));
  EXPECT_EQ(seqs[0].num_stored(), 2);
  EXPECT_THAT(seqs[2].token_ids, ElementsAre(1, A + 6));
  EXPECT_THAT(seqs[2].stored, ElementsAre(0, 0));
  o.skip_first = 4;
  EXPECT_EQ(OpenSequenceReader(o, ByteEncoder()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(DatasetTest, RendersChatDocuments) {
  DatasetOptions o;
  o.path = WriteFile("chat.jsonl", R"({"messages": [{"role": "user", "content": "Hi"}, )"
                                   R"({"role": "assistant", "content": "Yo"}]})"
                                   "\n");
  o.format = DataFormat::kChat;
  o.chat_format = ChatFormat::kChatML;
  o.seq_len = 1000;
  auto seqs = ReadAll(o, ByteEncoder());
  ASSERT_EQ(seqs.size(), 1u);
  std::string expected = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n";
  ASSERT_EQ(seqs[0].length(), static_cast<int64_t>(expected.size()) + 1);
  EXPECT_EQ(seqs[0].token_ids[0], 1);
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(seqs[0].token_ids[i + 1], static_cast<unsigned char>(expected[i]) + 3);
  }
}

TEST(DatasetTest, ChatLineWithoutMessagesNamesFileAndLine) {
  DatasetOptions o;
  o.path = WriteFile("chat_bad.jsonl", R"({"messages": [{"role": "user", "content": "Hi"}]})"
                                       "\n"
                                       R"({"messages": [{"role": "user"}]})"
                                       "\n");
  o.format = DataFormat::kChat;
  o.seq_len = 8;
  absl::Status st = DrainError(o, ByteEncoder());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr(o.path + ":2: messages[0] needs string fields"));
}

TEST(DatasetTest, MalformedJsonlGivesFileAndLineNumber) {
  DatasetOptions o;
  o.path = WriteFile("malformed.jsonl",
                     "{\"text\": \"fine\"}\n\n{\"text\": \"broken\n{\"text\": \"later\"}\n");
  o.seq_len = 2;  // small, so that the reader must reach line 3
  absl::Status st = DrainError(o, ByteEncoder());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr(o.path + ":3: malformed JSON"));

  o.path = WriteFile("missing_field.jsonl", "{\"text\": \"fine\"}\n{\"body\": \"x\"}\n");
  st = DrainError(o, ByteEncoder());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr(o.path + ":2: missing string field \"text\""));
}

TEST(DatasetTest, EmptyDatasetIsAClearError) {
  DatasetOptions o;
  o.seq_len = 8;
  for (const char* contents : {"", "\n\n  \n", "{\"text\": \"\"}\n{\"text\": \"\"}\n"}) {
    o.path = WriteFile("empty.jsonl", contents);
    absl::Status st = DrainError(o, ByteEncoder());
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << contents;
    EXPECT_THAT(st.message(), HasSubstr(o.path + ": dataset is empty"));
    EXPECT_EQ(CountSequences(o, ByteEncoder()).status().code(), absl::StatusCode::kInvalidArgument);
  }
  EXPECT_THAT(DetectDataFormat(WriteFile("empty2.jsonl", "")).status().message(),
              HasSubstr("dataset is empty"));
}

TEST(DatasetTest, MissingFileIsNotFound) {
  DatasetOptions o;
  o.path = TempPath("does_not_exist.jsonl");
  o.seq_len = 4;
  auto reader = OpenSequenceReader(o, ByteEncoder());
  EXPECT_EQ(reader.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(reader.status().message(), HasSubstr("does_not_exist.jsonl"));
}

TEST(DatasetTest, DetectsFormat) {
  EXPECT_EQ(*DetectDataFormat(WriteFile("d1.jsonl", "\n{\"text\": \"x\"}\n")), DataFormat::kText);
  EXPECT_EQ(*DetectDataFormat(WriteFile("d2.jsonl", "{\"messages\": []}\n")), DataFormat::kChat);
  EXPECT_EQ(*DetectDataFormat(TempPath("whatever.safetensors")), DataFormat::kTokens);
  auto bad = DetectDataFormat(WriteFile("d3.jsonl", "[1, 2]\n"));
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr(":1: cannot tell the dataset format"));
  EXPECT_EQ(*ParseDataFormat("tokens"), DataFormat::kTokens);
  EXPECT_EQ(ParseDataFormat("csv").status().code(), absl::StatusCode::kInvalidArgument);
}

// Writes input_ids (and attention_mask when given) as a tokens dataset.
template <typename T>
std::string WriteTokens(const std::string& name, const std::vector<T>& ids, int64_t rows,
                        int64_t cols, const std::vector<int64_t>* mask = nullptr) {
  tensor_io::SafetensorsWriter w;
  auto dtype = sizeof(T) == 8 ? tensor_io::DType::kI64 : tensor_io::DType::kI32;
  EXPECT_TRUE(w.Add("input_ids", dtype, {rows, cols}, ids.data(), ids.size() * sizeof(T)).ok());
  if (mask != nullptr) {
    EXPECT_TRUE(w.Add("attention_mask", tensor_io::DType::kI64, {rows, cols}, mask->data(),
                      mask->size() * 8)
                    .ok());
  }
  std::string path = TempPath(name);
  EXPECT_TRUE(w.Write(path).ok());
  return path;
}

TEST(DatasetTest, TokensFileRowsAreSequencesWithMask) {
  std::vector<int64_t> ids = {5, 6, 7, 8, 0, 0, 9, 10, 11, 12, 13, 14};
  std::vector<int64_t> mask = {1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1};
  DatasetOptions o;
  o.path = WriteTokens("tokens.safetensors", ids, 3, 4, &mask);
  o.format = DataFormat::kTokens;
  o.skip_first = 1;
  auto seqs = ReadAll(o, TextEncoder{});
  ASSERT_EQ(seqs.size(), 3u);
  EXPECT_THAT(seqs[1].token_ids, ElementsAre(0, 0, 9, 10));  // left padding
  EXPECT_THAT(seqs[1].attention, ElementsAre(0, 0, 1, 1));
  EXPECT_THAT(seqs[1].stored, ElementsAre(0, 0, 0, 1));  // skip_first counts real tokens
  EXPECT_THAT(seqs[0].stored, ElementsAre(0, 1, 1, 1));
  EXPECT_EQ(seqs[2].sequence_id, 2);
  EXPECT_EQ(*CountSequences(o, TextEncoder{}), 3);
  EXPECT_EQ(*EffectiveSequenceLength(o), 4);

  // seq_len cuts rows to their first columns; a range starts at its row.
  o.seq_len = 2;
  o.skip_first = 0;
  auto cut = ReadAll(o, TextEncoder{}, SequenceRange{2, 10});
  ASSERT_EQ(cut.size(), 1u);
  EXPECT_EQ(cut[0].sequence_id, 2);
  EXPECT_THAT(cut[0].token_ids, ElementsAre(11, 12));
}

TEST(DatasetTest, TokensFileAcceptsI32AndRejectsBadFiles) {
  std::vector<int32_t> ids = {3, 4, 5, 6};
  DatasetOptions o;
  o.path = WriteTokens("tokens32.safetensors", ids, 2, 2);
  o.format = DataFormat::kTokens;
  auto seqs = ReadAll(o, TextEncoder{});
  ASSERT_EQ(seqs.size(), 2u);
  EXPECT_THAT(seqs[1].token_ids, ElementsAre(5, 6));

  std::vector<int32_t> none;
  o.path = WriteTokens("tokens_empty.safetensors", none, 0, 4);
  auto empty = OpenSequenceReader(o, TextEncoder{});
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(empty.status().message(), HasSubstr("dataset is empty"));

  tensor_io::SafetensorsWriter w;
  float f[2] = {1, 2};
  ASSERT_TRUE(w.Add("input_ids", tensor_io::DType::kF32, {1, 2}, f, sizeof f).ok());
  o.path = TempPath("tokens_f32.safetensors");
  ASSERT_TRUE(w.Write(o.path).ok());
  auto bad = OpenSequenceReader(o, TextEncoder{});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("input_ids has dtype F32"));
}

TEST(DatasetTest, RankRangesTileTheDataset) {
  EXPECT_EQ(RankRange(10, 0, 3)->begin, 0);
  EXPECT_EQ(RankRange(10, 0, 3)->end, 3);
  EXPECT_EQ(RankRange(10, 1, 3)->end, 6);
  EXPECT_EQ(RankRange(10, 2, 3)->end, 10);
  EXPECT_EQ(RankRange(1, 0, 2)->size(), 0);
  EXPECT_EQ(RankRange(1, 1, 2)->size(), 1);
  EXPECT_EQ(RankRange(10, 3, 3).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(RankRange(10, 0, 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(*SequencesForTokenBudget(100, 8, 1), 15);  // 7 stored per sequence
  EXPECT_EQ(*SequencesForTokenBudget(0, 8, 1), kUnboundedSequences);
  EXPECT_EQ(SequencesForTokenBudget(10, 8, 8).status().code(), absl::StatusCode::kInvalidArgument);
}

// A text dataset of `documents` random lower-case documents of 1..max_length letters.
std::string WriteRandomText(const std::string& name, int documents, int max_length, int seed) {
  std::mt19937 rng(seed);
  std::string jsonl;
  for (int d = 0; d < documents; ++d) {
    std::string text(1 + rng() % max_length, 'a');
    for (char& c : text) c = static_cast<char>('a' + rng() % 26);
    jsonl += "{\"text\": \"" + text + "\"}\n";
  }
  return WriteFile(name, jsonl);
}

TEST(DatasetTest, ShardedReadsConcatenateToTheSingleProcessSequences) {
  DatasetOptions o;
  o.path = WriteRandomText("shard.jsonl", 40, 37, 7);
  o.seq_len = 16;
  o.skip_first = 1;
  auto single = ReadAll(o, ByteEncoder());
  auto total = CountSequences(o, ByteEncoder());
  ASSERT_TRUE(total.ok()) << total.status();
  ASSERT_EQ(static_cast<int64_t>(single.size()), *total);
  ASSERT_GT(*total, 10);
  for (int world = 1; world <= 4; ++world) {
    std::vector<TokenSequence> joined;
    for (int rank = 0; rank < world; ++rank) {
      auto range = RankRange(*total, rank, world);
      ASSERT_TRUE(range.ok());
      auto part = ReadAll(o, ByteEncoder(), *range);
      EXPECT_EQ(static_cast<int64_t>(part.size()), range->size());
      joined.insert(joined.end(), part.begin(), part.end());
    }
    ASSERT_EQ(joined.size(), single.size()) << "world " << world;
    for (size_t i = 0; i < single.size(); ++i) {
      EXPECT_EQ(joined[i].sequence_id, single[i].sequence_id);
      EXPECT_EQ(joined[i].token_ids, single[i].token_ids);
      EXPECT_EQ(joined[i].stored, single[i].stored);
    }
  }
}

TEST(DatasetTest, GuidedChunksTileTheDatasetLargestFirst) {
  // 256 sequences, 2 ranks, batches of 8: a quarter first, then shrinking; whole batches while a
  // chunk is at least one batch, never below half a batch except for the remainder at the end.
  auto chunks = GuidedChunks(256, 2, 8);
  ASSERT_TRUE(chunks.ok()) << chunks.status();
  std::vector<int64_t> sizes;
  for (const SequenceRange& c : *chunks) sizes.push_back(c.size());
  EXPECT_THAT(sizes, ElementsAre(64, 48, 40, 32, 24, 16, 8, 6, 5, 4, 4, 4, 1));
  for (int64_t total : {0, 1, 7, 100, 12345}) {
    for (int world : {1, 2, 3, 8}) {
      for (int64_t batch : {1, 3, 8}) {
        auto c = GuidedChunks(total, world, batch);
        ASSERT_TRUE(c.ok()) << c.status();
        int64_t next = 0;
        for (size_t i = 0; i < c->size(); ++i) {
          const SequenceRange& r = (*c)[i];
          EXPECT_EQ(r.begin, next) << total << "/" << world << "/" << batch;
          EXPECT_GT(r.size(), 0);
          if (i + 1 < c->size()) {
            EXPECT_GE(r.size(), (batch + 1) / 2);
          }
          if (i > 0) {
            EXPECT_LE(r.size(), (*c)[i - 1].size());
          }
          next = r.end;
        }
        EXPECT_EQ(next, total);
      }
    }
  }
  EXPECT_EQ(GuidedChunks(-1, 2, 8).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(GuidedChunks(10, 0, 8).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(GuidedChunks(10, 2, 0).status().code(), absl::StatusCode::kInvalidArgument);
}

// A claiming rank opens one reader over everything and skips to each chunk it takes: what it
// reads for a chunk is what a single process reads at those positions, for text and tokens.
TEST(DatasetTest, SkipToReadsTheChunksARankTakes) {
  DatasetOptions text;
  text.path = WriteRandomText("skip.jsonl", 30, 29, 11);
  text.seq_len = 8;
  text.skip_first = 1;
  std::vector<int64_t> ids(40 * 3);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int64_t>(i % 97);
  DatasetOptions tokens;
  tokens.path = WriteTokens("skip.safetensors", ids, 40, 3);
  tokens.format = DataFormat::kTokens;
  for (const DatasetOptions& o : {text, tokens}) {
    const TextEncoder encoder = o.format == DataFormat::kTokens ? TextEncoder{} : ByteEncoder();
    auto single = ReadAll(o, encoder);
    const int64_t total = static_cast<int64_t>(single.size());
    ASSERT_GT(total, 12);
    auto chunks = GuidedChunks(total, 2, 2);
    ASSERT_TRUE(chunks.ok());
    auto reader = OpenSequenceReader(o, encoder, SequenceRange{0, total});
    ASSERT_TRUE(reader.ok()) << reader.status();
    TokenSequence s;
    (*reader)->SkipTo(0);                             // at the reader's position: no effect
    for (size_t c = 1; c < chunks->size(); c += 2) {  // every other chunk, as one rank might
      (*reader)->SkipTo((*chunks)[c].begin);
      for (int64_t i = (*chunks)[c].begin; i < (*chunks)[c].end; ++i) {
        auto more = (*reader)->Next(&s);
        ASSERT_TRUE(more.ok() && *more) << more.status();
        EXPECT_EQ(s.sequence_id, i);
        EXPECT_EQ(s.token_ids, single[i].token_ids);
        EXPECT_EQ(s.stored, single[i].stored);
      }
      (*reader)->SkipTo((*chunks)[c].begin);  // behind the reader: no effect
    }
    (*reader)->SkipTo(total + 5);
    auto more = (*reader)->Next(&s);
    ASSERT_TRUE(more.ok());
    EXPECT_FALSE(*more);
  }
}

}  // namespace
}  // namespace crossdiff::data
