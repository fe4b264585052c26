#include "core/harvest/harvest.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/activations/store.h"
#include "core/data/sequence_range.h"
#include "core/models/causal_lm.h"
#include "core/tokenizer/tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/harvest/model_dirs.h"

namespace crossdiff::harvest {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using testing::LlamaFixtureDir;

#define ASSERT_OK(expr)           \
  do {                            \
    auto _st = (expr);            \
    ASSERT_TRUE(_st.ok()) << _st; \
  } while (0)

// Model directories shared by every test (built once: the fixtures are tiny).
struct Dirs {
  std::string root, base, finetune, base_tok, finetune_tok, finetune_other_tok, wide, small_vocab;
};
Dirs* dirs = nullptr;

class HarvestTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dirs = new Dirs;
    dirs->root = (fs::path(::testing::TempDir()) / "crossdiff_harvest_test").string();
    fs::remove_all(dirs->root);
    fs::create_directories(dirs->root);
    dirs->base = LlamaFixtureDir();
    dirs->finetune = dirs->root + "/finetune";
    ASSERT_OK(testing::WritePerturbedCopy(dirs->base, dirs->finetune, 0.02, 1234));
    // The same pair with a tokenizer each; and a fine-tune whose tokenizer differs by one merge.
    dirs->base_tok = dirs->root + "/base_tok";
    dirs->finetune_tok = dirs->root + "/finetune_tok";
    dirs->finetune_other_tok = dirs->root + "/finetune_other_tok";
    for (const auto& [src, dst] : std::vector<std::pair<std::string, std::string>>{
             {dirs->base, dirs->base_tok},
             {dirs->finetune, dirs->finetune_tok},
             {dirs->finetune, dirs->finetune_other_tok}}) {
      fs::create_directories(dst);
      for (const char* f : {"config.json", "model.safetensors"}) {
        fs::copy_file(fs::path(src) / f, fs::path(dst) / f, fs::copy_options::overwrite_existing);
      }
    }
    ASSERT_OK(testing::WriteSmallTokenizer(dirs->base_tok));
    ASSERT_OK(testing::WriteSmallTokenizer(dirs->finetune_tok));
    ASSERT_OK(testing::WriteSmallTokenizer(dirs->finetune_other_tok, 239));
    // Unpairable variants: a wider residual stream (config says hidden_size 96; the pairing check
    // refuses before any weight is read) and a cut vocabulary.
    dirs->wide = dirs->root + "/wide";
    ASSERT_OK(testing::WriteConfigVariant(dirs->finetune, dirs->wide, "hidden_size", 96));
    dirs->small_vocab = dirs->root + "/small_vocab";
    ASSERT_OK(testing::WriteVocabVariant(dirs->finetune, dirs->small_vocab, 256));
  }
  static void TearDownTestSuite() {
    delete dirs;
    dirs = nullptr;
  }

  std::string Out(const std::string& name) { return dirs->root + "/out_" + name; }

  // 6 sequences of 12 tokens; sequence 2 is right-padded (5 pads), sequence 4 left-padded (3).
  std::string TokensDataset(at::Tensor* ids_out = nullptr, at::Tensor* mask_out = nullptr) {
    at::Generator gen = at::detail::createCPUGenerator(42);
    at::Tensor ids = at::randint(0, 512, {6, 12}, gen, at::kLong);
    at::Tensor mask = at::ones({6, 12}, at::kLong);
    mask[2].slice(0, 7, 12).fill_(0);
    mask[4].slice(0, 0, 3).fill_(0);
    std::string path = dirs->root + "/tokens.safetensors";
    EXPECT_TRUE(testing::WriteTokensDataset(path, ids, mask).ok());
    if (ids_out) *ids_out = ids;
    if (mask_out) *mask_out = mask;
    return path;
  }

  std::string TextDataset() {
    std::string path = dirs->root + "/text.jsonl";
    std::ofstream out(path);
    const char* docs[] = {
        "The quick brown fox jumps over the lazy dog.",
        "Licenses grant rights; they also state conditions.",
        "Short one.",
        "A longer document about software, freedom, copying and distribution of programs.",
        "Bonjour le monde",
        "Numbers 12345 and symbols #!@"};
    for (const char* d : docs) out << nlohmann::json({{"text", d}}).dump() << "\n";
    return path;
  }

  HarvestOptions TokensOptions(const std::string& out) {
    HarvestOptions o;
    o.base_dir = dirs->base;
    o.finetune_dir = dirs->finetune;
    o.data_path = TokensDataset();
    o.layer = 1;
    o.out_dir = out;
    o.batch_size = 4;
    o.rows_per_shard = 7;
    o.threads = 1;
    return o;
  }
};

// Every stored row equals ResidualAfterBlock of the same sequence run on its own (so padding and
// batching change nothing), for both models.
void ExpectStoreMatchesModels(const std::string& store_dir, const std::string& base_dir,
                              const std::string& finetune_dir, int layer,
                              const std::map<int64_t, std::pair<at::Tensor, at::Tensor>>& seqs,
                              double atol) {
  auto reader = activations::StoreReader::Open(store_dir);
  ASSERT_TRUE(reader.ok()) << reader.status();
  const int64_t rows = (*reader)->manifest().rows;
  auto all = (*reader)->ReadRows(0, rows);
  ASSERT_TRUE(all.ok()) << all.status();
  auto base = models::CausalLM::Load(base_dir);
  auto finetune = models::CausalLM::Load(finetune_dir);
  ASSERT_TRUE(base.ok() && finetune.ok());
  c10::InferenceMode guard;
  std::map<int64_t, std::pair<at::Tensor, at::Tensor>> expected;  // sequence -> [T, d] x 2
  for (const auto& [id, seq] : seqs) {
    auto b = (*base)->ResidualAfterBlock(seq.first.unsqueeze(0), seq.second.unsqueeze(0), layer);
    auto f =
        (*finetune)->ResidualAfterBlock(seq.first.unsqueeze(0), seq.second.unsqueeze(0), layer);
    ASSERT_TRUE(b.ok() && f.ok());
    expected[id] = {(*b)[0], (*f)[0]};
  }
  double max_model_gap = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t s = all->sequence_ids[r].item<int64_t>();
    const int64_t p = all->positions[r].item<int32_t>();
    ASSERT_TRUE(expected.count(s)) << "row " << r << " has unknown sequence " << s;
    const auto& seq = seqs.at(s);
    EXPECT_EQ(seq.second[p].item<int64_t>(), 1) << "padding stored at row " << r;
    EXPECT_EQ(all->token_ids[r].item<int32_t>(), seq.first[p].item<int64_t>()) << "row " << r;
    at::Tensor got = all->activations[r];
    EXPECT_TRUE(at::allclose(got[0], expected[s].first[p], 0, atol)) << "base row " << r;
    EXPECT_TRUE(at::allclose(got[1], expected[s].second[p], 0, atol)) << "finetune row " << r;
    max_model_gap = std::max(max_model_gap, (got[0] - got[1]).abs().max().item<double>());
  }
  EXPECT_GT(max_model_gap, 1e-3) << "base and fine-tune rows are identical";
}

std::map<int64_t, std::pair<at::Tensor, at::Tensor>> Rows(const at::Tensor& ids,
                                                          const at::Tensor& mask) {
  std::map<int64_t, std::pair<at::Tensor, at::Tensor>> m;
  for (int64_t s = 0; s < ids.size(0); ++s) m[s] = {ids[s], mask[s]};
  return m;
}

TEST_F(HarvestTest, StoredRowsEqualResidualAfterBlockWithoutPadding) {
  HarvestOptions o = TokensOptions(Out("basic"));
  o.skip_first = 1;
  at::Tensor ids, mask;
  o.data_path = TokensDataset(&ids, &mask);
  auto r = RunHarvest(o, nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  // Stored: every attended token but the first of each sequence.
  const int64_t expected_rows = mask.sum().item<int64_t>() - 6;
  EXPECT_EQ(r->rows, expected_rows);
  EXPECT_EQ(r->sequences, 6);

  auto manifest = activations::Manifest::Load(o.out_dir);
  ASSERT_TRUE(manifest.ok()) << manifest.status();
  EXPECT_EQ(manifest->rows, expected_rows);
  EXPECT_EQ(manifest->layer, 1);
  EXPECT_EQ(manifest->d_model, 64);
  EXPECT_EQ(manifest->dtype, "float32");
  EXPECT_EQ(manifest->site, "resid_post");
  EXPECT_EQ(manifest->models, (std::vector<std::string>{dirs->base, dirs->finetune}));
  EXPECT_EQ(manifest->shards.size(), static_cast<size_t>((expected_rows + 6) / 7));
  auto extra = nlohmann::json::parse(manifest->extra_json);
  EXPECT_EQ(extra["dataset"], o.data_path);
  EXPECT_EQ(extra["skip_first"], 1);
  EXPECT_EQ(extra["seq_len"], 12);
  EXPECT_TRUE(extra["tokenizer"].is_null());

  ExpectStoreMatchesModels(o.out_dir, dirs->base, dirs->finetune, 1, Rows(ids, mask), 1e-5);
  // skip_first: position of the first attended token is never stored.
  auto reader = activations::StoreReader::Open(o.out_dir);
  auto all = (*reader)->ReadRows(0, expected_rows);
  at::Tensor seq4 = all->positions.masked_select(all->sequence_ids == 4);
  EXPECT_EQ(seq4.min().item<int32_t>(), 4);  // 3 pads, then the skipped first real token
}

TEST_F(HarvestTest, StoresBfloat16) {
  HarvestOptions o = TokensOptions(Out("bf16"));
  o.dtype = "bfloat16";
  at::Tensor ids, mask;
  o.data_path = TokensDataset(&ids, &mask);
  auto r = RunHarvest(o, nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->manifest.dtype, "bfloat16");
  ExpectStoreMatchesModels(o.out_dir, dirs->base, dirs->finetune, 1, Rows(ids, mask), 5e-2);
}

TEST_F(HarvestTest, MaxTokensRoundsUpToWholeSequences) {
  HarvestOptions o = TokensOptions(Out("max_tokens"));
  at::Tensor ids = at::randint(0, 512, {6, 12}, at::kLong);
  o.data_path = dirs->root + "/tokens_full.safetensors";
  ASSERT_OK(testing::WriteTokensDataset(o.data_path, ids, at::Tensor()));
  o.skip_first = 1;
  o.max_tokens = 15;  // 11 stored per sequence -> 2 sequences
  auto r = RunHarvest(o, nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->sequences, 2);
  EXPECT_EQ(r->rows, 22);
}

TEST_F(HarvestTest, TextDatasetIsTokenisedPackedAndHarvested) {
  HarvestOptions o;
  o.base_dir = dirs->base_tok;
  o.finetune_dir = dirs->finetune_tok;
  o.data_path = TextDataset();
  o.layer = 2;
  o.out_dir = Out("text");
  o.seq_len = 16;
  o.batch_size = 3;
  auto r = RunHarvest(o, nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  auto tok = tokenizer::Tokenizer::Load(dirs->base_tok);
  ASSERT_TRUE(tok.ok()) << tok.status();
  // The store's tokens, in order, are BOS + 15 stream tokens per sequence; the stream is the
  // documents joined by EOS.
  auto reader = activations::StoreReader::Open(o.out_dir);
  ASSERT_TRUE(reader.ok()) << reader.status();
  auto all = (*reader)->ReadRows(0, r->rows);
  ASSERT_TRUE(all.ok());
  std::vector<int32_t> stream;
  std::ifstream in(o.data_path);
  std::string line;
  bool first = true;
  while (std::getline(in, line)) {
    if (!first) stream.push_back(*(*tok)->eos_id());
    first = false;
    auto ids = (*tok)->Encode(nlohmann::json::parse(line)["text"].get<std::string>(), false);
    ASSERT_TRUE(ids.ok());
    stream.insert(stream.end(), ids->begin(), ids->end());
  }
  const int32_t bos = *(*tok)->bos_id();
  std::map<int64_t, std::pair<at::Tensor, at::Tensor>> seqs;
  size_t next = 0;
  int64_t row = 0;
  for (int64_t s = 0; next < stream.size(); ++s) {
    std::vector<int64_t> seq = {bos};
    while (seq.size() < 16 && next < stream.size()) seq.push_back(stream[next++]);
    at::Tensor t = at::tensor(seq, at::kLong);
    seqs[s] = {t, at::ones_like(t)};
    for (size_t p = 0; p < seq.size(); ++p, ++row) {
      ASSERT_LT(row, r->rows);
      EXPECT_EQ(all->token_ids[row].item<int32_t>(), seq[p]);
      EXPECT_EQ(all->sequence_ids[row].item<int64_t>(), s);
      EXPECT_EQ(all->positions[row].item<int32_t>(), static_cast<int32_t>(p));
    }
  }
  EXPECT_EQ(row, r->rows);
  ExpectStoreMatchesModels(o.out_dir, dirs->base_tok, dirs->finetune_tok, 2, seqs, 1e-5);
  auto extra = nlohmann::json::parse(r->manifest.extra_json);
  EXPECT_EQ(extra["tokenizer"], dirs->base_tok);
  EXPECT_EQ(extra["data_format"], "text");
}

TEST_F(HarvestTest, ChatDatasetUsesTheTemplatesFormat) {
  HarvestOptions o;
  o.base_dir = dirs->base_tok;
  o.finetune_dir = dirs->finetune_tok;
  o.data_path = dirs->root + "/chat.jsonl";
  std::ofstream(o.data_path) << R"({"messages": [{"role": "user", "content": "Hi there"}, )"
                             << R"({"role": "assistant", "content": "Hello!"}]})"
                             << "\n";
  o.layer = 0;
  o.out_dir = Out("chat");
  o.seq_len = 64;
  auto r = RunHarvest(o, nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  auto extra = nlohmann::json::parse(r->manifest.extra_json);
  EXPECT_EQ(extra["data_format"], "chat");
  EXPECT_EQ(extra["chat_format"], "chatml");
  auto tok = tokenizer::Tokenizer::Load(dirs->base_tok);
  auto expected = (*tok)->Encode(
      "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n", false);
  ASSERT_TRUE(expected.ok());
  EXPECT_EQ(r->rows, static_cast<int64_t>(expected->size()) + 1);  // + BOS
}

TEST_F(HarvestTest, RefusesPairsWithDifferentDModel) {
  HarvestOptions o = TokensOptions(Out("wide"));
  o.finetune_dir = dirs->wide;
  auto r = RunHarvest(o, nullptr);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(),
              HasSubstr("cannot pair base " + dirs->base + " with fine-tune " + dirs->wide +
                        ": d_model differs (64 vs 96)"));
  EXPECT_FALSE(fs::exists(o.out_dir));
}

TEST_F(HarvestTest, RefusesPairsWithDifferentVocabulary) {
  HarvestOptions o = TokensOptions(Out("vocab"));
  o.finetune_dir = dirs->small_vocab;
  auto r = RunHarvest(o, nullptr);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("vocabulary size differs (512 vs 256)"));
  EXPECT_THAT(r.status().message(), HasSubstr(dirs->small_vocab));
}

TEST_F(HarvestTest, RefusesPairsWithDifferentTokenizers) {
  HarvestOptions o = TokensOptions(Out("tokenizers"));
  o.base_dir = dirs->base_tok;
  o.finetune_dir = dirs->finetune_other_tok;
  auto r = RunHarvest(o, nullptr);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("tokenizers differ"));
  EXPECT_THAT(r.status().message(), HasSubstr(dirs->finetune_other_tok));

  o.finetune_dir = dirs->finetune;  // no tokenizer at all
  r = RunHarvest(o, nullptr);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("only " + dirs->base_tok + " has a tokenizer"));
}

TEST_F(HarvestTest, LayerOutOfRangeNamesTheModel) {
  HarvestOptions o = TokensOptions(Out("layer"));
  o.layer = 3;
  auto r = RunHarvest(o, nullptr);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(),
              HasSubstr("layer 3 is out of range: " + dirs->base + " has 3 blocks"));
}

TEST_F(HarvestTest, CancelledHarvestLeavesNoManifest) {
  HarvestOptions o = TokensOptions(Out("cancel"));
  o.batch_size = 1;
  o.rows_per_shard = 5;
  o.progress_interval_s = 0;
  std::atomic<bool> cancel{false};
  o.cancel = &cancel;
  int updates = 0;
  auto r = RunHarvest(o, [&](const ProgressUpdate& u) {
    if (++updates == 3) cancel = true;
  });
  EXPECT_EQ(r.status().code(), absl::StatusCode::kCancelled);
  EXPECT_THAT(r.status().message(), HasSubstr("no manifest written"));
  EXPECT_TRUE(fs::exists(o.out_dir + "/shard-000000.safetensors"));  // work was written...
  EXPECT_FALSE(fs::exists(o.out_dir + "/manifest.json"));            // ...but is not complete
  EXPECT_FALSE(activations::StoreReader::Open(o.out_dir).ok());
}

TEST_F(HarvestTest, FailureMidwayLeavesNoManifest) {
  HarvestOptions o = TokensOptions(Out("midway"));
  at::Tensor ids = at::randint(0, 512, {6, 12}, at::kLong);
  ids[5][3] = 600;  // outside the 512-token vocabulary, in the second batch
  o.data_path = dirs->root + "/tokens_bad.safetensors";
  ASSERT_OK(testing::WriteTokensDataset(o.data_path, ids, at::Tensor()));
  o.rows_per_shard = 10;
  auto r = RunHarvest(o, nullptr);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(),
              HasSubstr("sequence 5 position 3: token id 600 is outside the vocabulary"));
  EXPECT_TRUE(fs::exists(o.out_dir + "/shard-000000.safetensors"));
  EXPECT_FALSE(fs::exists(o.out_dir + "/manifest.json"));
}

TEST_F(HarvestTest, EmptyDatasetIsAnError) {
  HarvestOptions o = TokensOptions(Out("empty_tokens"));
  o.data_path = dirs->root + "/tokens_empty.safetensors";
  ASSERT_OK(testing::WriteTokensDataset(o.data_path, at::zeros({0, 12}, at::kLong), at::Tensor()));
  auto r = RunHarvest(o, nullptr);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr(o.data_path + ": dataset is empty"));

  o.base_dir = dirs->base_tok;
  o.finetune_dir = dirs->finetune_tok;
  o.data_path = dirs->root + "/empty.jsonl";
  o.data_format = "text";
  std::ofstream(o.data_path) << "\n";
  o.out_dir = Out("empty_text");
  r = RunHarvest(o, nullptr);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr(o.data_path + ": dataset is empty"));
  EXPECT_FALSE(fs::exists(o.out_dir + "/manifest.json"));
}

TEST_F(HarvestTest, RefusesToOverwriteACompleteStore) {
  HarvestOptions o = TokensOptions(Out("twice"));
  ASSERT_TRUE(RunHarvest(o, nullptr).ok());
  auto again = RunHarvest(o, nullptr);
  EXPECT_EQ(again.status().code(), absl::StatusCode::kFailedPrecondition);
}

HarvestOptions ShardedTextOptions(const std::string& text, const std::string& out) {
  HarvestOptions o;
  o.base_dir = dirs->base_tok;
  o.finetune_dir = dirs->finetune_tok;
  o.data_path = text;
  o.layer = 1;
  o.seq_len = 10;
  o.skip_first = 1;
  o.batch_size = 2;
  o.rows_per_shard = 8;
  o.out_dir = out;
  return o;
}

void ExpectSameRows(const std::string& single_dir, const std::string& sharded_dir) {
  auto a = activations::StoreReader::Open(single_dir);
  auto b = activations::StoreReader::Open(sharded_dir);
  ASSERT_TRUE(a.ok() && b.ok()) << a.status() << b.status();
  ASSERT_EQ((*a)->rows(), (*b)->rows());
  auto ra = (*a)->ReadRows(0, (*a)->rows());
  auto rb = (*b)->ReadRows(0, (*b)->rows());
  ASSERT_TRUE(ra.ok() && rb.ok());
  EXPECT_TRUE(at::equal(ra->token_ids, rb->token_ids));
  EXPECT_TRUE(at::equal(ra->sequence_ids, rb->sequence_ids));
  EXPECT_TRUE(at::equal(ra->positions, rb->positions));
  EXPECT_TRUE(at::allclose(ra->activations, rb->activations, 0, 1e-5));
}

TEST_F(HarvestTest, TwoRanksThenMergeEqualOneProcessRowForRow) {
  HarvestOptions o = ShardedTextOptions(TextDataset(), Out("single"));
  auto single = RunHarvest(o, nullptr);
  ASSERT_TRUE(single.ok()) << single.status();

  o.out_dir = Out("sharded");
  o.world_size = 2;
  int64_t rank_rows = 0;
  for (int rank = 0; rank < 2; ++rank) {
    o.rank = rank;
    auto part = RunHarvest(o, nullptr);
    ASSERT_TRUE(part.ok()) << part.status();
    EXPECT_FALSE(fs::exists(o.out_dir + "/manifest.json"));  // a part is never a complete store
    ASSERT_EQ(part->chunks.size(), 1u);                      // fixed ranges: chunk r is rank r's
    EXPECT_EQ(part->chunks[0].index, rank);
    rank_rows += part->rows;
    if (rank == 0) {
      auto early = MergeHarvestParts(o.out_dir, 2);
      EXPECT_EQ(early.status().code(), absl::StatusCode::kNotFound);
      EXPECT_THAT(early.status().message(), HasSubstr("rank 1 of 2 has not finished"));
    }
  }
  auto merged = MergeHarvestParts(o.out_dir, 2);
  ASSERT_TRUE(merged.ok()) << merged.status();
  EXPECT_EQ(merged->rows, single->rows);
  EXPECT_EQ(rank_rows, single->rows);
  auto extra = nlohmann::json::parse(merged->extra_json);
  EXPECT_EQ(extra["world_size"], 2);
  EXPECT_EQ(extra["sequences"], single->sequences);
  ExpectSameRows(Out("single"), o.out_dir);
  EXPECT_EQ(MergeHarvestParts(o.out_dir, 2).status().code(), absl::StatusCode::kFailedPrecondition);
}

// Claiming ranks: each takes the chunks its claim function hands out (here a fixed interleaving,
// as two ranks of different speeds might get them); the merge puts them back in chunk order.
TEST_F(HarvestTest, ClaimedChunksMergeInChunkOrderToTheSingleProcessStore) {
  const std::string text = TextDataset();
  HarvestOptions o = ShardedTextOptions(text, Out("claim_single"));
  auto single = RunHarvest(o, nullptr);
  ASSERT_TRUE(single.ok()) << single.status();
  auto schedule = data::GuidedChunks(single->sequences, 2, o.batch_size);
  ASSERT_TRUE(schedule.ok());
  const int64_t n = static_cast<int64_t>(schedule->size());
  ASSERT_GE(n, 4) << "the dataset is too small to interleave chunks";

  // Runs both ranks into `out`, rank r claiming the chunks in takes[r] (then "none left").
  auto run = [&](const std::string& out,
                 const std::vector<std::vector<int64_t>>& takes) -> absl::Status {
    HarvestOptions r = ShardedTextOptions(text, out);
    r.world_size = 2;
    for (int rank = 0; rank < 2; ++rank) {
      r.rank = rank;
      size_t next = 0;
      const std::vector<int64_t>& mine = takes[rank];
      r.claim_chunk = [&mine, &next, n]() -> absl::StatusOr<int64_t> {
        return next < mine.size() ? mine[next++] : n;
      };
      auto part = RunHarvest(r, nullptr);
      if (!part.ok()) return part.status();
      if (part->chunks.size() != mine.size()) return absl::InternalError("chunks taken");
    }
    return MergeHarvestParts(out, 2).status();
  };
  std::vector<std::vector<int64_t>> takes(2);
  for (int64_t c = 0; c < n; ++c) takes[c % 3 == 1 ? 0 : 1].push_back(c);  // rank 1 takes most
  ASSERT_OK(run(Out("claimed"), takes));
  ExpectSameRows(Out("claim_single"), Out("claimed"));
  auto part0 = activations::Manifest::LoadFile(PartManifestPath(Out("claimed"), 0, 2));
  ASSERT_TRUE(part0.ok()) << part0.status();
  auto extra0 = nlohmann::json::parse(part0->extra_json);
  EXPECT_EQ(extra0["chunk_count"], n);
  EXPECT_EQ(extra0["chunks"][0]["index"], 1);
  EXPECT_EQ(extra0["chunks"][0]["first_sequence"], (*schedule)[1].begin);
  EXPECT_EQ(extra0["chunks"][0]["end_sequence"], (*schedule)[1].end);
  EXPECT_THAT(part0->shards[0].file, HasSubstr(ChunkShardPrefix(1)));

  // A chunk nobody harvested, or one harvested twice, is an error naming it; nothing is merged.
  std::vector<std::vector<int64_t>> missing = takes;
  missing[1].erase(missing[1].begin() + 1);
  absl::Status st = run(Out("claimed_missing"), missing);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr(absl::StrCat("chunk ", takes[1][1], " of ", n,
                                                   " is in no rank's part manifest")));
  EXPECT_FALSE(fs::exists(Out("claimed_missing") + "/manifest.json"));
  std::vector<std::vector<int64_t>> twice = takes;
  twice[0].insert(twice[0].begin(), 0);  // rank 1 takes chunk 0 as well
  st = run(Out("claimed_twice"), twice);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(),
              HasSubstr(absl::StrCat("chunk 0 of ", n, " was harvested by rank 0 and by rank 1")));
  // A counter that goes backwards (not shared, or reset) is caught by the rank.
  st = run(Out("claimed_backwards"), {{2, 1}, {}});
  EXPECT_EQ(st.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(st.message(), HasSubstr("rank 0 claimed chunk 1 after chunk 2"));
}

}  // namespace
}  // namespace crossdiff::harvest
