// The safetensors reader, checkpoint index and atomic writer, without LibTorch.
#include "core/tensor_io/safetensors.h"

#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/tensor_io/test_util.h"

namespace crossdiff::tensor_io {
namespace {

using ::crossdiff::testing_util::RawSafetensors;
using ::crossdiff::testing_util::ScratchDir;
using ::crossdiff::testing_util::WriteBytes;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

#define EXPECT_STATUS(expr, expected_code, substr)                  \
  do {                                                              \
    auto status_ = (expr).status();                                 \
    EXPECT_EQ(status_.code(), (expected_code)) << status_;          \
    EXPECT_THAT(std::string(status_.message()), HasSubstr(substr)); \
  } while (0)

std::string FixturesDir() {
  const char* env = std::getenv("CROSSDIFF_FIXTURES");
  return env != nullptr ? env : CROSSDIFF_SOURCE_DIR "/../shared/fixtures";
}

std::vector<uint8_t> Pattern(size_t n, uint8_t seed) {
  std::vector<uint8_t> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<uint8_t>(seed + i * 7);
  return out;
}

// Runs fn with the process's file-size limit lowered to `bytes` (write() past it fails with EFBIG
// instead of raising SIGXFSZ), then restores the limit.
absl::Status WithFileSizeLimit(rlim_t bytes, const std::function<absl::Status()>& fn) {
  struct rlimit old_limit;
  if (::getrlimit(RLIMIT_FSIZE, &old_limit) != 0) return absl::InternalError("getrlimit");
  auto old_handler = ::signal(SIGXFSZ, SIG_IGN);
  struct rlimit limit = old_limit;
  limit.rlim_cur = bytes;
  if (::setrlimit(RLIMIT_FSIZE, &limit) != 0) return absl::InternalError("setrlimit");
  absl::Status s = fn();
  ::setrlimit(RLIMIT_FSIZE, &old_limit);
  ::signal(SIGXFSZ, old_handler);
  return s;
}

TEST(DTypeTest, NamesAndSizes) {
  struct Case {
    const char* name;
    size_t size;
  } cases[] = {{"F32", 4}, {"F16", 2}, {"BF16", 2}, {"F64", 8}, {"I64", 8},
               {"I32", 4}, {"I16", 2}, {"I8", 1},   {"U8", 1},  {"BOOL", 1}};
  for (const auto& c : cases) {
    auto d = ParseDType(c.name);
    ASSERT_TRUE(d.ok()) << c.name;
    EXPECT_EQ(DTypeName(*d), c.name);
    EXPECT_EQ(DTypeSize(*d), c.size) << c.name;
  }
  EXPECT_STATUS(ParseDType("F8_E4M3"), absl::StatusCode::kInvalidArgument,
                "unknown dtype 'F8_E4M3'");
}

TEST(SafetensorsTest, RoundTripsEveryDType) {
  ScratchDir dir;
  const DType all[] = {DType::kF32, DType::kF16, DType::kBF16, DType::kF64, DType::kI64,
                       DType::kI32, DType::kI16, DType::kI8,   DType::kU8,  DType::kBool};
  SafetensorsWriter writer;
  std::map<std::string, std::vector<uint8_t>> expected;
  uint8_t seed = 1;
  for (DType d : all) {
    std::string name = "t_" + std::string(DTypeName(d));
    std::vector<uint8_t> bytes = Pattern(3 * 5 * DTypeSize(d), seed++);
    if (d == DType::kBool) {
      for (auto& b : bytes) b &= 1;
    }
    ASSERT_TRUE(writer.Add(name, d, {3, 5}, bytes.data(), bytes.size()).ok());
    expected[name] = bytes;
  }
  std::vector<uint8_t> empty;
  ASSERT_TRUE(writer.Add("empty", DType::kF32, {0, 4}, nullptr, 0).ok());
  float scalar = 2.5f;
  ASSERT_TRUE(writer.Add("scalar", DType::kF32, {}, &scalar, 4).ok());
  writer.SetMetadata("format", "pt");
  const std::string path = dir.file("all.safetensors");
  ASSERT_TRUE(writer.Write(path).ok());

  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->tensors().size(), 12u);
  EXPECT_EQ((*file)->metadata().at("format"), "pt");
  for (const auto& [name, bytes] : expected) {
    auto info = (*file)->Get(name);
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_THAT((*info)->shape, ElementsAre(3, 5));
    EXPECT_EQ((*info)->numel(), 15);
    ASSERT_EQ((*info)->nbytes(), bytes.size());
    EXPECT_EQ(std::memcmp((*file)->data(**info), bytes.data(), bytes.size()), 0) << name;
  }
  EXPECT_EQ((*file)->Find("empty")->nbytes(), 0u);
  const TensorInfo* s = (*file)->Find("scalar");
  ASSERT_NE(s, nullptr);
  EXPECT_TRUE(s->shape.empty());
  float back = 0;
  std::memcpy(&back, (*file)->data(*s), 4);
  EXPECT_EQ(back, 2.5f);
}

TEST(SafetensorsTest, WriterPadsHeaderWithSpacesAndSortsByName) {
  ScratchDir dir;
  SafetensorsWriter writer;
  int32_t b[3] = {1, 2, 3};
  uint8_t a[1] = {9};
  ASSERT_TRUE(writer.Add("b", DType::kI32, {3}, b, sizeof(b)).ok());
  ASSERT_TRUE(writer.Add("a", DType::kU8, {1}, a, 1).ok());
  ASSERT_TRUE(writer.Write(dir.file("x.safetensors")).ok());
  std::ifstream in(dir.file("x.safetensors"), std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  EXPECT_EQ((8 + n) % 8, 0u);
  std::string header = bytes.substr(8, n);
  std::string tail = header.substr(header.rfind('}') + 1);
  EXPECT_EQ(tail.find_first_not_of(' '), std::string::npos);  // padded with spaces only
  auto file = SafetensorsFile::Open(dir.file("x.safetensors"));
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_EQ((*file)->tensors().size(), 2u);
  EXPECT_EQ((*file)->tensors()[0].name, "a");  // data laid out in name order
  EXPECT_EQ((*file)->tensors()[0].begin, 0u);
  EXPECT_EQ((*file)->tensors()[1].begin, 1u);
}

TEST(SafetensorsTest, ReadsTheLlamaFixture) {
  const std::string dir = FixturesDir() + "/hf/llama";
  auto file = SafetensorsFile::Open(dir + "/model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->tensors().size(), 30u);
  EXPECT_EQ((*file)->metadata().at("format"), "pt");
  auto info = (*file)->Get("model.layers.0.self_attn.q_proj.weight");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ((*info)->dtype, DType::kF32);
  EXPECT_THAT((*info)->shape, ElementsAre(64, 64));
  EXPECT_EQ((*info)->begin, 385536u);
  std::vector<float> values(64 * 64);
  std::memcpy(values.data(), (*file)->data(**info), values.size() * 4);
  EXPECT_FLOAT_EQ(values[0], -0.04397299f);
  EXPECT_FLOAT_EQ(values[1], -0.2709688f);
  double sum = std::accumulate(values.begin(), values.end(), 0.0);
  EXPECT_NEAR(sum, 6.11042763505975, 1e-9);  // numpy's float64 sum of the same bytes

  auto ckpt = Checkpoint::Open(dir);  // a directory with model.safetensors
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ((*ckpt)->names().size(), 30u);
  EXPECT_TRUE((*ckpt)->Contains("lm_head.weight"));
  EXPECT_STATUS((*ckpt)->Get("model.layers.9.mlp.up_proj.weight"), absl::StatusCode::kNotFound,
                "no tensor named 'model.layers.9.mlp.up_proj.weight'");
}

// Writes a two-shard checkpoint with an index.json, as Hugging Face ships large models.
void WriteShardedCheckpoint(const std::string& dir) {
  float a[4] = {1, 2, 3, 4};
  int64_t b[2] = {7, 8};
  SafetensorsWriter w1, w2;
  ASSERT_TRUE(w1.Add("layer.a", DType::kF32, {2, 2}, a, sizeof(a)).ok());
  ASSERT_TRUE(w2.Add("layer.b", DType::kI64, {2}, b, sizeof(b)).ok());
  ASSERT_TRUE(w1.Write(dir + "/model-00001-of-00002.safetensors").ok());
  ASSERT_TRUE(w2.Write(dir + "/model-00002-of-00002.safetensors").ok());
  WriteBytes(dir + "/model.safetensors.index.json",
             R"({"metadata": {"total_size": 32}, "weight_map": {
                 "layer.a": "model-00001-of-00002.safetensors",
                 "layer.b": "model-00002-of-00002.safetensors"}})");
}

TEST(CheckpointTest, ReadsShardedCheckpointTransparently) {
  ScratchDir dir;
  WriteShardedCheckpoint(dir.path());
  for (const std::string& path : {dir.path(), dir.file("model.safetensors.index.json")}) {
    auto ckpt = Checkpoint::Open(path);
    ASSERT_TRUE(ckpt.ok()) << ckpt.status();
    EXPECT_THAT((*ckpt)->names(), ElementsAre("layer.a", "layer.b"));
    auto a = (*ckpt)->Get("layer.a");
    ASSERT_TRUE(a.ok());
    EXPECT_THAT((*a)->shape, ElementsAre(2, 2));
    auto fa = (*ckpt)->FileOf("layer.a");
    auto fb = (*ckpt)->FileOf("layer.b");
    ASSERT_TRUE(fa.ok() && fb.ok());
    EXPECT_NE(*fa, *fb);
    int64_t b[2];
    std::memcpy(b, (*fb)->data(**(*ckpt)->Get("layer.b")), sizeof(b));
    EXPECT_EQ(b[1], 8);
  }
}

TEST(CheckpointTest, IndexNamingMissingShardIsNotFound) {
  ScratchDir dir;
  WriteShardedCheckpoint(dir.path());
  ASSERT_EQ(std::remove(dir.file("model-00002-of-00002.safetensors").c_str()), 0);
  EXPECT_STATUS(Checkpoint::Open(dir.path()), absl::StatusCode::kNotFound,
                "shard 'model-00002-of-00002.safetensors' named by weight_map");
}

TEST(CheckpointTest, IndexPointingAtWrongShardIsRejected) {
  ScratchDir dir;
  WriteShardedCheckpoint(dir.path());
  WriteBytes(dir.file("model.safetensors.index.json"),
             R"({"weight_map": {"layer.b": "model-00001-of-00002.safetensors"}})");
  EXPECT_STATUS(Checkpoint::Open(dir.path()), absl::StatusCode::kInvalidArgument,
                "weight_map puts tensor 'layer.b' in 'model-00001-of-00002.safetensors'");
}

TEST(CheckpointTest, EmptyDirectoryIsNotFound) {
  ScratchDir dir;
  EXPECT_STATUS(Checkpoint::Open(dir.path()), absl::StatusCode::kNotFound,
                "holds neither model.safetensors nor model.safetensors.index.json");
}

// ---- bad input: each a one-line error naming the file

class BadFileTest : public ::testing::Test {
 protected:
  std::string Write(const std::string& bytes) {
    std::string path = dir_.file("bad.safetensors");
    WriteBytes(path, bytes);
    return path;
  }
  ScratchDir dir_;
};

TEST_F(BadFileTest, MissingFile) {
  EXPECT_STATUS(SafetensorsFile::Open(dir_.file("nope.safetensors")), absl::StatusCode::kNotFound,
                "nope.safetensors: cannot open");
}

TEST_F(BadFileTest, TruncatedBeforeHeaderLength) {
  std::string path = Write("abcde");
  EXPECT_STATUS(SafetensorsFile::Open(path), absl::StatusCode::kInvalidArgument,
                path + ": truncated: 5 bytes");
}

TEST_F(BadFileTest, TruncatedDataSection) {
  // A valid file cut short: the last tensor's range now ends past the data section.
  std::string header = R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})";
  std::string path = Write(RawSafetensors(header, 10));
  EXPECT_STATUS(SafetensorsFile::Open(path), absl::StatusCode::kInvalidArgument,
                "tensor 'w': data_offsets [0, 16] out of range: the data section holds 10 bytes");
}

TEST_F(BadFileTest, HeaderLengthBeyondFile) {
  std::string bytes = RawSafetensors("{}", 0);
  uint64_t huge = 1000;
  std::memcpy(bytes.data(), &huge, 8);
  std::string path = Write(bytes);
  EXPECT_STATUS(SafetensorsFile::Open(path), absl::StatusCode::kInvalidArgument,
                "header length 1000 exceeds the file (10 bytes");
}

TEST_F(BadFileTest, MalformedJson) {
  std::string path = Write(RawSafetensors(R"({"w":{"dtype":"F32",)", 0));
  EXPECT_STATUS(SafetensorsFile::Open(path), absl::StatusCode::kInvalidArgument,
                "header is not well-formed JSON");
}

TEST_F(BadFileTest, HeaderNotAnObject) {
  std::string path = Write(RawSafetensors("[1,2]", 0));
  EXPECT_STATUS(SafetensorsFile::Open(path), absl::StatusCode::kInvalidArgument,
                "header is not a JSON object");
}

TEST_F(BadFileTest, UnknownDType) {
  std::string header = R"({"w":{"dtype":"F8","shape":[4],"data_offsets":[0,4]}})";
  std::string path = Write(RawSafetensors(header, 4));
  EXPECT_STATUS(SafetensorsFile::Open(path), absl::StatusCode::kInvalidArgument,
                "tensor 'w': unknown dtype 'F8'");
}

TEST_F(BadFileTest, DTypeShapeSizeMismatch) {
  std::string header = R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,16]}})";
  std::string path = Write(RawSafetensors(header, 16));
  EXPECT_STATUS(SafetensorsFile::Open(path), absl::StatusCode::kInvalidArgument,
                "tensor 'w': dtype F32 x shape [2, 3] needs 24 bytes but data_offsets [0, 16] "
                "span 16");
}

TEST_F(BadFileTest, NegativeDimension) {
  std::string header = R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})";
  std::string path = Write(RawSafetensors(header, 4));
  EXPECT_STATUS(SafetensorsFile::Open(path), absl::StatusCode::kInvalidArgument,
                "field 'shape' holds -1");
}

TEST_F(BadFileTest, OverlappingOffsets) {
  std::string header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                       R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})";
  std::string path = Write(RawSafetensors(header, 12));
  EXPECT_STATUS(SafetensorsFile::Open(path), absl::StatusCode::kInvalidArgument,
                "tensors 'a' [0, 8) and 'b' [4, 12) have overlapping data_offsets");
}

TEST_F(BadFileTest, OutOfRangeOffsets) {
  std::string header = R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                       R"("b":{"dtype":"U8","shape":[4],"data_offsets":[100,104]}})";
  std::string path = Write(RawSafetensors(header, 8));
  EXPECT_STATUS(SafetensorsFile::Open(path), absl::StatusCode::kInvalidArgument,
                "tensor 'b': data_offsets [100, 104] out of range: the data section holds 8 bytes");
}

TEST_F(BadFileTest, EndBeforeBegin) {
  std::string header = R"({"a":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}})";
  std::string path = Write(RawSafetensors(header, 8));
  EXPECT_STATUS(SafetensorsFile::Open(path), absl::StatusCode::kInvalidArgument,
                "data_offsets [4, 0] end before begin");
}

TEST_F(BadFileTest, MissingField) {
  std::string header = R"({"a":{"dtype":"U8","shape":[4]}})";
  std::string path = Write(RawSafetensors(header, 4));
  EXPECT_STATUS(SafetensorsFile::Open(path), absl::StatusCode::kInvalidArgument,
                "tensor 'a': field 'data_offsets' missing");
}

TEST_F(BadFileTest, MissingTensor) {
  std::string header = R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})";
  std::string path = Write(RawSafetensors(header, 4));
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->Find("b"), nullptr);
  EXPECT_STATUS((*file)->Get("b"), absl::StatusCode::kNotFound, path + ": no tensor named 'b'");
}

// ---- the writer

TEST(SafetensorsWriterTest, RejectsSizeMismatchAndDuplicates) {
  SafetensorsWriter w;
  float x[3] = {};
  absl::Status s = w.Add("x", DType::kF32, {2, 2}, x, sizeof(x));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("tensor 'x': dtype F32 x shape [2, 2] does not match 12 bytes"));
  ASSERT_TRUE(w.Add("x", DType::kF32, {3}, x, sizeof(x)).ok());
  s = w.Add("x", DType::kF32, {3}, x, sizeof(x));
  EXPECT_EQ(s.code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(std::string(s.message()), HasSubstr("tensor 'x' added twice"));
}

TEST(SafetensorsWriterTest, FailedRenameLeavesNoPartialFile) {
  ScratchDir dir;
  // The target is a non-empty directory: the data is written to the temporary file, then the
  // rename fails. The temporary must be gone and the directory untouched.
  const std::string target = dir.file("target");
  ASSERT_EQ(::mkdir(target.c_str(), 0755), 0);
  WriteBytes(target + "/keep", "x");
  SafetensorsWriter w;
  float x[2] = {1, 2};
  ASSERT_TRUE(w.Add("x", DType::kF32, {2}, x, sizeof(x)).ok());
  absl::Status s = w.Write(target);
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr(target + ": cannot rename"));
  EXPECT_THAT(dir.List(), ElementsAre("target"));
}

TEST(SafetensorsWriterTest, FailedWriteLeavesOldFileAndNoPartialFile) {
  ScratchDir dir;
  const std::string path = dir.file("model.safetensors");
  SafetensorsWriter small;
  uint8_t one = 1;
  ASSERT_TRUE(small.Add("old", DType::kU8, {1}, &one, 1).ok());
  ASSERT_TRUE(small.Write(path).ok());

  // A file-size limit makes write() fail with EFBIG half way through a 1 MiB tensor.
  std::vector<uint8_t> big(1 << 20, 3);
  SafetensorsWriter w;
  ASSERT_TRUE(w.Add("big", DType::kU8, {1 << 20}, big.data(), big.size()).ok());
  absl::Status s = WithFileSizeLimit(64 * 1024, [&] { return w.Write(path); });

  EXPECT_EQ(s.code(), absl::StatusCode::kOutOfRange) << s;  // EFBIG
  EXPECT_THAT(std::string(s.message()), HasSubstr(path + ": write failed"));
  EXPECT_THAT(dir.List(), ElementsAre("model.safetensors"));
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_NE((*file)->Find("old"), nullptr);
}

TEST(SafetensorsWriterTest, BorrowedBytesAreWritten) {
  ScratchDir dir;
  std::vector<int16_t> v = {1, -2, 3};
  SafetensorsWriter w;
  ASSERT_TRUE(w.AddBorrowed("v", DType::kI16, {3}, v.data(), 6).ok());
  ASSERT_TRUE(w.Write(dir.file("v.safetensors")).ok());
  auto file = SafetensorsFile::Open(dir.file("v.safetensors"));
  ASSERT_TRUE(file.ok());
  int16_t back[3];
  std::memcpy(back, (*file)->data(*(*file)->Find("v")), 6);
  EXPECT_EQ(back[1], -2);
  (*file)->ReleasePages(0, (*file)->data_size());  // a hint: the bytes stay readable
  std::memcpy(back, (*file)->data(*(*file)->Find("v")), 6);
  EXPECT_EQ(back[2], 3);
}

TEST(SafetensorsRowWriterTest, RowsArrivingInBatchesReadBackAsOneTensorPerColumn) {
  ScratchDir dir;
  const std::string path = dir.file("rows.safetensors");
  std::vector<SafetensorsRowWriter::Column> cols = {
      {"values", DType::kBF16, {2, 3}}, {"ids", DType::kI64, {}}, {"pos", DType::kI32, {}}};
  auto w = SafetensorsRowWriter::Open(path, cols, 1000, {{"format", "test"}});
  ASSERT_TRUE(w.ok()) << w.status();
  const std::vector<uint8_t> values = Pattern(7 * 6 * 2, 5);
  std::vector<int64_t> ids(7);
  std::vector<int32_t> pos(7);
  std::iota(ids.begin(), ids.end(), int64_t{1} << 40);
  std::iota(pos.begin(), pos.end(), -3);
  // Batches of 3, 0 and 4 rows.
  ASSERT_TRUE((*w)->Append({values.data(), ids.data(), pos.data()}, 3).ok());
  ASSERT_TRUE((*w)->Append({values.data(), ids.data(), pos.data()}, 0).ok());
  EXPECT_THAT(dir.List(), ::testing::Not(::testing::Contains("rows.safetensors")))
      << "the file appears only when finished";
  ASSERT_TRUE((*w)->Append({values.data() + 3 * 12, ids.data() + 3, pos.data() + 3}, 4).ok());
  EXPECT_EQ((*w)->rows(), 7);
  ASSERT_TRUE((*w)->Finish().ok());
  EXPECT_THAT(dir.List(), ElementsAre("rows.safetensors"));  // no temporary file left

  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->metadata().at("format"), "test");
  const TensorInfo* v = (*file)->Find("values");
  ASSERT_NE(v, nullptr);
  EXPECT_THAT(v->shape, ElementsAre(7, 2, 3));
  EXPECT_EQ(v->begin, 0u);  // the streamed column comes first in the data section
  EXPECT_EQ(std::memcmp((*file)->data(*v), values.data(), values.size()), 0);
  const TensorInfo* i = (*file)->Find("ids");
  ASSERT_NE(i, nullptr);
  EXPECT_THAT(i->shape, ElementsAre(7));
  EXPECT_EQ(std::memcmp((*file)->data(*i), ids.data(), 7 * 8), 0);
  const TensorInfo* p = (*file)->Find("pos");
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(std::memcmp((*file)->data(*p), pos.data(), 7 * 4), 0);
  EXPECT_EQ((*file)->data_size(), values.size() + 7 * 8 + 7 * 4);
  // The header (its room reserved for 1000 rows) is padded with spaces to an 8-byte boundary.
  const std::string raw = testing_util::ReadBytes(path);
  uint64_t len = 0;
  std::memcpy(&len, raw.data(), 8);
  EXPECT_EQ(len % 8, 0u);
  EXPECT_EQ(raw[8 + len - 1], ' ');
}

TEST(SafetensorsRowWriterTest, RejectsTooManyRowsAndLeavesNothingWhenAbandoned) {
  ScratchDir dir;
  const std::string path = dir.file("rows.safetensors");
  {
    auto w = SafetensorsRowWriter::Open(path, {{"x", DType::kF32, {2}}}, 3);
    ASSERT_TRUE(w.ok()) << w.status();
    float x[8] = {};
    ASSERT_TRUE((*w)->Append({x}, 2).ok());
    absl::Status s = (*w)->Append({x}, 2);
    EXPECT_EQ(s.code(), absl::StatusCode::kOutOfRange) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr("max_rows 3"));
    EXPECT_EQ((*w)->Append({x, x}, 1).code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(dir.List().size(), 1u);  // the temporary file
  }
  EXPECT_TRUE(dir.List().empty()) << "an unfinished writer removes its temporary file";
  EXPECT_EQ(SafetensorsRowWriter::Open(path, {{"x", DType::kF32, {}}, {"x", DType::kI32, {}}}, 3)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(SafetensorsRowWriterTest, FailedWriteLeavesNoFileAndTheWriterUnusable) {
  ScratchDir dir;
  const std::string path = dir.file("rows.safetensors");
  auto w = SafetensorsRowWriter::Open(path, {{"x", DType::kU8, {1024}}}, 1024);
  ASSERT_TRUE(w.ok()) << w.status();
  std::vector<uint8_t> rows(256 * 1024, 1);
  absl::Status s = WithFileSizeLimit(64 * 1024, [&] { return (*w)->Append({rows.data()}, 256); });
  EXPECT_EQ(s.code(), absl::StatusCode::kOutOfRange) << s;  // EFBIG
  EXPECT_THAT(std::string(s.message()), HasSubstr(path + ": write failed"));
  EXPECT_TRUE(dir.List().empty());
  EXPECT_EQ((*w)->Append({rows.data()}, 1).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ((*w)->Finish().code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace crossdiff::tensor_io
