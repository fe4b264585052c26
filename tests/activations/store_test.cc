// The activation store: manifest validation, streaming writer, validating reader.
#include "core/activations/store.h"

#include <cmath>
#include <fstream>
#include <map>

#include "core/activations/manifest.h"
#include "core/tensor_io/torch_tensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/activations/store_fixture.h"
#include "tests/tensor_io/test_util.h"

namespace crossdiff::activations {
namespace {

using ::crossdiff::testing_util::ScratchDir;
using ::crossdiff::testing_util::WriteBytes;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

#define EXPECT_STATUS(expr, expected_code, substr)                             \
  do {                                                                         \
    auto status_ = (expr);                                                     \
    EXPECT_EQ(StatusOf(status_).code(), (expected_code)) << StatusOf(status_); \
    EXPECT_THAT(std::string(StatusOf(status_).message()), HasSubstr(substr));  \
  } while (0)

absl::Status StatusOf(const absl::Status& s) { return s; }
template <typename T>
absl::Status StatusOf(const absl::StatusOr<T>& s) {
  return s.status();
}

std::string ReadText(const std::string& path) {
  std::ifstream in(path);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// ---- manifest

Manifest ValidManifest() {
  Manifest m;
  m.models = {"base", "ft"};
  m.layer = 3;
  m.d_model = 8;
  m.dtype = "bfloat16";
  m.rows = 5;
  m.shards = {{"shard-000000.safetensors", 3}, {"shard-000001.safetensors", 2}};
  m.extra_json = R"({"dataset": "d.jsonl"})";
  return m;
}

TEST(ManifestTest, RoundTripsThroughJson) {
  ScratchDir dir;
  Manifest m = ValidManifest();
  ASSERT_TRUE(m.Save(dir.path()).ok());
  EXPECT_THAT(dir.List(), ElementsAre("manifest.json"));
  auto back = Manifest::Load(dir.path());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->models, m.models);
  EXPECT_EQ(back->layer, 3);
  EXPECT_EQ(back->site, "resid_post");
  EXPECT_EQ(back->d_model, 8);
  EXPECT_EQ(back->dtype, "bfloat16");
  EXPECT_EQ(back->rows, 5);
  ASSERT_EQ(back->shards.size(), 2u);
  EXPECT_EQ(back->shards[1].file, "shard-000001.safetensors");
  EXPECT_EQ(back->shards[1].rows, 2);
  EXPECT_EQ(back->extra_json, R"({"dataset":"d.jsonl"})");
  std::string text = ReadText(dir.file("manifest.json"));
  EXPECT_THAT(text, HasSubstr(R"("format": "crossdiff.activations")"));
  EXPECT_THAT(text, HasSubstr(R"("version": 1)"));
}

TEST(ManifestTest, MissingManifestMeansIncompleteStore) {
  ScratchDir dir;
  EXPECT_STATUS(Manifest::Load(dir.path()), absl::StatusCode::kNotFound,
                dir.file("manifest.json") + ": not found: the store is incomplete");
}

struct BadManifestCase {
  const char* name;
  const char* json;
  const char* message;
};

class BadManifestTest : public ::testing::TestWithParam<BadManifestCase> {};

TEST_P(BadManifestTest, IsRejectedNamingFileAndField) {
  ScratchDir dir;
  WriteBytes(dir.file("manifest.json"), GetParam().json);
  EXPECT_STATUS(Manifest::Load(dir.path()), absl::StatusCode::kInvalidArgument,
                dir.file("manifest.json") + ": " + GetParam().message);
}

#define HEAD R"("format": "crossdiff.activations", "version": 1, )"
INSTANTIATE_TEST_SUITE_P(
    Cases, BadManifestTest,
    ::testing::Values(
        BadManifestCase{"NotJson", "{\"format\": ", "not well-formed JSON"},
        BadManifestCase{"WrongFormat", R"({"format": "other", "version": 1})",
                        "field 'format' is 'other', expected 'crossdiff.activations'"},
        BadManifestCase{"NewerVersion", R"({"format": "crossdiff.activations", "version": 2})",
                        "field 'version' is 2; this build reads version 1"},
        BadManifestCase{"NoModels",
                        "{" HEAD R"("models": [], "layer": 1, "site": "resid_post", "d_model": 4,
                        "dtype": "float32", "rows": 0, "shards": []})",
                        "field 'models' is empty"},
        BadManifestCase{"BadDType",
                        "{" HEAD R"("models": ["a","b"], "layer": 1, "site": "resid_post",
                        "d_model": 4, "dtype": "float16", "rows": 0, "shards": []})",
                        "field 'dtype' is 'float16', must be float32 or bfloat16"},
        BadManifestCase{"ZeroDModel",
                        "{" HEAD R"("models": ["a","b"], "layer": 1, "site": "resid_post",
                        "d_model": 0, "dtype": "float32", "rows": 0, "shards": []})",
                        "field 'd_model' is 0, must be > 0"},
        BadManifestCase{"MissingRows",
                        "{" HEAD R"("models": ["a","b"], "layer": 1, "site": "resid_post",
                        "d_model": 4, "dtype": "float32", "shards": []})",
                        "field 'rows' is missing"},
        BadManifestCase{"RowsMismatch",
                        "{" HEAD R"("models": ["a","b"], "layer": 1, "site": "resid_post",
                        "d_model": 4, "dtype": "float32", "rows": 10,
                        "shards": [{"file": "s.safetensors", "rows": 4}]})",
                        "field 'rows' is 10 but the shards hold 4 rows in total"},
        BadManifestCase{"ShardPathEscapes",
                        "{" HEAD R"("models": ["a","b"], "layer": 1, "site": "resid_post",
                        "d_model": 4, "dtype": "float32", "rows": 4,
                        "shards": [{"file": "../s.safetensors", "rows": 4}]})",
                        "field 'shards[0].file' is '../s.safetensors', not a file name"},
        BadManifestCase{"ShardNoRows",
                        "{" HEAD R"("models": ["a","b"], "layer": 1, "site": "resid_post",
                        "d_model": 4, "dtype": "float32", "rows": 0,
                        "shards": [{"file": "s.safetensors", "rows": 0}]})",
                        "field 'shards[0].rows' is 0, must be > 0"}),
    [](const ::testing::TestParamInfo<BadManifestCase>& info) { return info.param.name; });
#undef HEAD

TEST(ManifestTest, MergesPartsOfAShardedHarvest) {
  Manifest a = ValidManifest();
  Manifest b = ValidManifest();
  b.shards = {{"part1-000000.safetensors", 4}};
  b.rows = 4;
  auto merged = MergeManifests({a, b});
  ASSERT_TRUE(merged.ok()) << merged.status();
  EXPECT_EQ(merged->rows, 9);
  ASSERT_EQ(merged->shards.size(), 3u);
  EXPECT_EQ(merged->shards[2].file, "part1-000000.safetensors");

  Manifest c = b;
  c.d_model = 16;
  EXPECT_STATUS(MergeManifests({a, c}), absl::StatusCode::kInvalidArgument,
                "part 1: layer/site/d_model/dtype 3/resid_post/16/bfloat16 differ");
  EXPECT_STATUS(MergeManifests({a, a}), absl::StatusCode::kInvalidArgument,
                "part 1: shard file 'shard-000000.safetensors' already in another part");
}

// ---- writer + reader

TEST(StoreTest, WritesShardByShardAndReadsBack) {
  for (const std::string dtype : {"float32", "bfloat16"}) {
    SCOPED_TRACE(dtype);
    ScratchDir dir;
    StoreWriter::Options opts;
    opts.models = {"base", "ft"};
    opts.layer = 2;
    opts.d_model = 6;
    opts.dtype = dtype;
    opts.rows_per_shard = 4;
    auto writer = StoreWriter::Create(dir.path(), opts);
    ASSERT_TRUE(writer.ok()) << writer.status();
    // 3 + 5 + 2 = 10 rows -> shards of 4, 4, 2.
    ActivationBatch all = testing_util::MakeRows(10, 2, 6, /*seed=*/1);
    for (auto [lo, hi] : {std::pair{0, 3}, std::pair{3, 8}, std::pair{8, 10}}) {
      ASSERT_TRUE((*writer)->Append(testing_util::Slice(all, lo, hi)).ok());
    }
    // Two full shards are on disk already, the manifest is not.
    EXPECT_FALSE(std::ifstream(dir.file("manifest.json")).good());
    EXPECT_TRUE(std::ifstream(dir.file("shard-000001.safetensors")).good());
    EXPECT_STATUS(StoreReader::Open(dir.path()), absl::StatusCode::kNotFound,
                  "the store is incomplete");
    auto manifest = (*writer)->Finish();
    ASSERT_TRUE(manifest.ok()) << manifest.status();
    EXPECT_EQ(manifest->rows, 10);
    EXPECT_EQ(manifest->shards.size(), 3u);
    EXPECT_EQ(manifest->shards[2].rows, 2);
    EXPECT_STATUS((*writer)->Finish(), absl::StatusCode::kFailedPrecondition, "already finished");

    auto reader = StoreReader::Open(dir.path());
    ASSERT_TRUE(reader.ok()) << reader.status();
    EXPECT_EQ((*reader)->num_shards(), 3);
    at::Tensor expected = all.activations.to(dtype == "bfloat16" ? at::kBFloat16 : at::kFloat);
    auto shard1 = (*reader)->ReadShard(1, /*as_float=*/false);
    ASSERT_TRUE(shard1.ok()) << shard1.status();
    EXPECT_EQ(shard1->activations.scalar_type(), expected.scalar_type());
    EXPECT_TRUE(at::equal(shard1->activations, expected.slice(0, 4, 8)));
    auto rows = (*reader)->ReadRows(2, 9);  // crosses all three shards
    ASSERT_TRUE(rows.ok()) << rows.status();
    EXPECT_EQ(rows->activations.scalar_type(), at::kFloat);
    EXPECT_TRUE(at::equal(rows->activations, expected.slice(0, 2, 9).to(at::kFloat)));
    EXPECT_TRUE(at::equal(rows->token_ids, all.token_ids.slice(0, 2, 9).to(at::kInt)));
    EXPECT_TRUE(at::equal(rows->sequence_ids, all.sequence_ids.slice(0, 2, 9)));
    EXPECT_TRUE(at::equal(rows->positions, all.positions.slice(0, 2, 9).to(at::kInt)));
    auto gathered = (*reader)->GatherRows({9, 0, 5, 5});
    ASSERT_TRUE(gathered.ok());
    at::Tensor idx = at::tensor({9, 0, 5, 5}, at::kLong);
    EXPECT_TRUE(at::equal(gathered->activations, expected.index_select(0, idx).to(at::kFloat)));
    EXPECT_TRUE(at::equal(gathered->sequence_ids, all.sequence_ids.index_select(0, idx)));
    EXPECT_STATUS((*reader)->ReadRows(5, 11), absl::StatusCode::kOutOfRange,
                  "rows [5, 11) out of range [0, 10)");
    EXPECT_STATUS((*reader)->GatherRows({10}), absl::StatusCode::kOutOfRange, "row 10");
    // The same rows straight into a float32 buffer (bfloat16 widened exactly).
    at::Tensor into = at::full({4, expected.size(1), expected.size(2)}, -1.f);
    ASSERT_TRUE((*reader)->GatherActivations({9, 0, 5, 5}, into.data_ptr<float>()).ok());
    EXPECT_TRUE(at::equal(into, expected.index_select(0, idx).to(at::kFloat)));
    EXPECT_STATUS((*reader)->GatherActivations({3, -1}, into.data_ptr<float>()),
                  absl::StatusCode::kOutOfRange, "row -1");
    EXPECT_STATUS((*reader)->ReadShard(3), absl::StatusCode::kOutOfRange, "shard 3");
    EXPECT_TRUE((*reader)->CheckFinite(0).ok());
  }
}

TEST(StoreTest, RowsGoToTheOpenShardsFileAsTheyArrive) {
  ScratchDir dir;
  StoreWriter::Options opts;
  opts.models = {"base", "ft"};
  opts.d_model = 512;
  opts.rows_per_shard = 1 << 16;  // one shard: nothing is installed before Finish
  auto writer = StoreWriter::Create(dir.path(), opts);
  ASSERT_TRUE(writer.ok()) << writer.status();
  ASSERT_TRUE((*writer)->Append(testing_util::MakeRows(256, 2, 512, 0)).ok());  // warm up
  const int64_t before = testing_util::ResidentBytes();
  int64_t peak = before;
  for (int part = 1; part < 32; ++part) {  // 31 more batches of 1 MiB
    ASSERT_TRUE((*writer)->Append(testing_util::MakeRows(256, 2, 512, part)).ok());
    peak = std::max(peak, testing_util::ResidentBytes());
  }
  // Holding the shard until it is full would take 32 MiB.
  EXPECT_LT(peak - before, 8 << 20) << "before " << before << " peak " << peak;
  std::vector<std::string> files = dir.List();
  ASSERT_EQ(files.size(), 1u);
  EXPECT_THAT(files[0], HasSubstr("shard-000000.safetensors.tmp-")) << "only the open shard";
  auto manifest = (*writer)->Finish();
  ASSERT_TRUE(manifest.ok()) << manifest.status();
  EXPECT_EQ(manifest->rows, 32 * 256);
  EXPECT_THAT(dir.List(),
              ::testing::UnorderedElementsAre("shard-000000.safetensors", "manifest.json"));
  auto reader = StoreReader::Open(dir.path());
  ASSERT_TRUE(reader.ok()) << reader.status();
  auto rows = (*reader)->ReadRows(31 * 256, 32 * 256);
  ASSERT_TRUE(rows.ok()) << rows.status();
  ActivationBatch last = testing_util::MakeRows(256, 2, 512, 31);
  EXPECT_TRUE(at::equal(rows->activations, last.activations));
  EXPECT_TRUE(at::equal(rows->sequence_ids, last.sequence_ids));
}

TEST(StoreTest, AnAbandonedWriterLeavesNoShardFiles) {
  ScratchDir dir;
  StoreWriter::Options opts;
  opts.models = {"base", "ft"};
  opts.d_model = 4;
  opts.rows_per_shard = 3;
  {
    auto writer = StoreWriter::Create(dir.path(), opts);
    ASSERT_TRUE(writer.ok()) << writer.status();
    ASSERT_TRUE((*writer)->Append(testing_util::MakeRows(4, 2, 4, 0)).ok());
  }
  // The full shard stays (no manifest: the store reads as incomplete); the open one is removed.
  EXPECT_THAT(dir.List(), ElementsAre("shard-000000.safetensors"));
  EXPECT_STATUS(StoreReader::Open(dir.path()), absl::StatusCode::kNotFound,
                "the store is incomplete");
}

TEST(StoreTest, WriterRefusesCompleteStoreAndBadBatches) {
  ScratchDir dir;
  ASSERT_TRUE(testing_util::WriteStore(dir.path(), 4, 2, 3, "float32", 4).ok());
  StoreWriter::Options opts;
  opts.models = {"a", "b"};
  opts.d_model = 3;
  EXPECT_STATUS(StoreWriter::Create(dir.path(), opts), absl::StatusCode::kFailedPrecondition,
                "manifest.json already exists");

  ScratchDir fresh;
  opts.d_model = 0;
  EXPECT_STATUS(StoreWriter::Create(fresh.path(), opts), absl::StatusCode::kInvalidArgument,
                "option 'd_model' is 0");
  opts.d_model = 3;
  auto writer = StoreWriter::Create(fresh.path(), opts);
  ASSERT_TRUE(writer.ok());
  ActivationBatch wrong_width = testing_util::MakeRows(2, 2, 4, 1);
  EXPECT_STATUS((*writer)->Append(wrong_width), absl::StatusCode::kInvalidArgument,
                "field 'activations': shape [2, 2, 4], expected [rows, 2, 3]");
  ActivationBatch b = testing_util::MakeRows(2, 2, 3, 1);
  b.token_ids = at::zeros({3}, at::kInt);
  EXPECT_STATUS((*writer)->Append(b), absl::StatusCode::kInvalidArgument,
                "field 'token_ids': shape [3], expected [2]");
  b = testing_util::MakeRows(2, 2, 3, 1);
  b.positions = at::full({2}, int64_t{1} << 40, at::kLong);
  EXPECT_STATUS((*writer)->Append(b), absl::StatusCode::kInvalidArgument,
                "field 'positions': values [1099511627776, 1099511627776] do not fit int32");
  b = testing_util::MakeRows(2, 2, 3, 1);
  b.sequence_ids = at::zeros({2}, at::kFloat);
  EXPECT_STATUS((*writer)->Append(b), absl::StatusCode::kInvalidArgument,
                "field 'sequence_ids': dtype Float, expected integers");
}

TEST(StoreTest, EmptyStoreAndSingleModelStoreAreReadable) {
  ScratchDir empty;
  ASSERT_TRUE(testing_util::WriteStore(empty.path(), 0, 2, 3, "float32", 4).ok());
  auto reader = StoreReader::Open(empty.path());
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_EQ((*reader)->rows(), 0);
  EXPECT_EQ((*reader)->num_shards(), 0);

  ScratchDir single;  // one model: valid here, the trainer rejects it
  ASSERT_TRUE(testing_util::WriteStore(single.path(), 5, 1, 3, "bfloat16", 4).ok());
  reader = StoreReader::Open(single.path());
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_EQ((*reader)->manifest().n_models(), 1);
  auto rows = (*reader)->ReadRows(0, 5);
  ASSERT_TRUE(rows.ok());
  EXPECT_EQ(rows->activations.sizes(), at::IntArrayRef({5, 1, 3}));
}

TEST(StoreTest, PartsOfAShardedHarvestMergeIntoOneStore) {
  ScratchDir dir;
  std::vector<Manifest> parts;
  for (int part = 0; part < 2; ++part) {
    StoreWriter::Options opts;
    opts.models = {"a", "b"};
    opts.d_model = 3;
    opts.rows_per_shard = 4;
    opts.shard_prefix = "part" + std::to_string(part) + "-";
    auto w = StoreWriter::Create(dir.path(), opts);
    ASSERT_TRUE(w.ok());
    ASSERT_TRUE((*w)->Append(testing_util::MakeRows(6, 2, 3, part)).ok());
    auto m = (*w)->Finish(/*write_manifest=*/false);
    ASSERT_TRUE(m.ok());
    parts.push_back(*m);
  }
  EXPECT_FALSE(std::ifstream(dir.file("manifest.json")).good());
  auto merged = MergeManifests(parts);
  ASSERT_TRUE(merged.ok()) << merged.status();
  ASSERT_TRUE(merged->Save(dir.path()).ok());
  auto reader = StoreReader::Open(dir.path());
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_EQ((*reader)->rows(), 12);
  EXPECT_EQ((*reader)->manifest().shards[2].file, "part1-000000.safetensors");
}

// ---- bad stores

class BadStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(testing_util::WriteStore(dir_.path(), 6, 2, 3, "float32", 4).ok());
  }
  std::string Shard0() const { return dir_.file("shard-000000.safetensors"); }
  // Replaces shard 0 by the given tensors.
  void RewriteShard0(const std::map<std::string, at::Tensor>& tensors) {
    tensor_io::SafetensorsWriter w;
    for (const auto& [name, t] : tensors) ASSERT_TRUE(tensor_io::AddTensor(w, name, t).ok());
    ASSERT_TRUE(w.Write(Shard0()).ok());
  }
  std::map<std::string, at::Tensor> GoodShard0() {
    ActivationBatch b = testing_util::MakeRows(4, 2, 3, 3);
    return {{"activations", b.activations},
            {"token_ids", b.token_ids.to(at::kInt)},
            {"sequence_ids", b.sequence_ids},
            {"positions", b.positions.to(at::kInt)}};
  }
  ScratchDir dir_;
};

TEST_F(BadStoreTest, GoodStoreOpens) { EXPECT_TRUE(StoreReader::Open(dir_.path()).ok()); }

TEST_F(BadStoreTest, MissingManifest) {
  ASSERT_EQ(std::remove(dir_.file("manifest.json").c_str()), 0);
  EXPECT_STATUS(StoreReader::Open(dir_.path()), absl::StatusCode::kNotFound,
                "manifest.json: not found: the store is incomplete");
}

TEST_F(BadStoreTest, MissingShard) {
  ASSERT_EQ(std::remove(dir_.file("shard-000001.safetensors").c_str()), 0);
  EXPECT_STATUS(StoreReader::Open(dir_.path()), absl::StatusCode::kNotFound,
                dir_.file("shard-000001.safetensors") + ": cannot open");
}

TEST_F(BadStoreTest, CorruptShard) {
  std::string bytes = ReadText(Shard0());
  WriteBytes(Shard0(), bytes.substr(0, bytes.size() - 10));  // truncated data section
  EXPECT_STATUS(StoreReader::Open(dir_.path()), absl::StatusCode::kInvalidArgument,
                Shard0() + ": tensor 'token_ids': data_offsets");
}

TEST_F(BadStoreTest, RowsMismatch) {
  auto t = GoodShard0();
  ActivationBatch b = testing_util::MakeRows(5, 2, 3, 3);
  RewriteShard0({{"activations", b.activations},
                 {"token_ids", b.token_ids.to(at::kInt)},
                 {"sequence_ids", b.sequence_ids},
                 {"positions", b.positions.to(at::kInt)}});
  EXPECT_STATUS(StoreReader::Open(dir_.path()), absl::StatusCode::kInvalidArgument,
                Shard0() + ": field 'activations': shape [5, 2, 3], expected [4, 2, 3]");
}

TEST_F(BadStoreTest, WrongActivationDType) {
  auto t = GoodShard0();
  t["activations"] = t["activations"].to(at::kBFloat16);
  RewriteShard0(t);
  EXPECT_STATUS(StoreReader::Open(dir_.path()), absl::StatusCode::kInvalidArgument,
                Shard0() +
                    ": field 'activations': dtype BF16, expected F32 (manifest.json says "
                    "dtype float32)");
}

TEST_F(BadStoreTest, WrongIdDTypes) {
  auto t = GoodShard0();
  t["token_ids"] = t["token_ids"].to(at::kLong);
  RewriteShard0(t);
  EXPECT_STATUS(StoreReader::Open(dir_.path()), absl::StatusCode::kInvalidArgument,
                Shard0() + ": field 'token_ids': dtype I64, expected I32");
  t = GoodShard0();
  t["sequence_ids"] = t["sequence_ids"].to(at::kInt);
  RewriteShard0(t);
  EXPECT_STATUS(StoreReader::Open(dir_.path()), absl::StatusCode::kInvalidArgument,
                Shard0() + ": field 'sequence_ids': dtype I32, expected I64");
}

TEST_F(BadStoreTest, MissingTensor) {
  auto t = GoodShard0();
  t.erase("positions");
  RewriteShard0(t);
  EXPECT_STATUS(StoreReader::Open(dir_.path()), absl::StatusCode::kInvalidArgument,
                Shard0() + ": field 'positions': tensor missing");
}

TEST_F(BadStoreTest, WrongModelCount) {
  auto t = GoodShard0();
  t["activations"] = t["activations"].slice(1, 0, 1).contiguous();
  RewriteShard0(t);
  EXPECT_STATUS(StoreReader::Open(dir_.path()), absl::StatusCode::kInvalidArgument,
                "shape [4, 1, 3], expected [4, 2, 3]");
}

TEST_F(BadStoreTest, NonFiniteActivationsAreFoundWithShardAndRow) {
  auto t = GoodShard0();
  t["activations"].index_put_({2, 1, 0}, std::nanf(""));
  RewriteShard0(t);
  auto reader = StoreReader::Open(dir_.path());
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_STATUS((*reader)->CheckFinite(0), absl::StatusCode::kInvalidArgument,
                Shard0() + ": field 'activations': row 2 (global row 2");
  EXPECT_TRUE((*reader)->CheckFinite(1).ok());
}

}  // namespace
}  // namespace crossdiff::activations
