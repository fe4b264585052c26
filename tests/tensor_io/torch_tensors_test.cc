// at::Tensor <-> safetensors conversions, every dtype including BF16 and F16.
#include "core/tensor_io/torch_tensors.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/tensor_io/test_util.h"

namespace crossdiff::tensor_io {
namespace {

using ::crossdiff::testing_util::ScratchDir;
using ::testing::HasSubstr;

TEST(TorchTensorsTest, RoundTripsEveryDType) {
  ScratchDir dir;
  const at::ScalarType types[] = {at::kFloat, at::kHalf,  at::kBFloat16, at::kDouble, at::kLong,
                                  at::kInt,   at::kShort, at::kChar,     at::kByte,   at::kBool};
  std::map<std::string, at::Tensor> originals;
  SafetensorsWriter writer;
  at::manual_seed(7);
  for (at::ScalarType type : types) {
    at::Tensor t;
    if (at::isFloatingType(type)) {
      t = at::randn({3, 4, 5}).to(type);
    } else if (type == at::kBool) {
      t = at::randint(0, 2, {3, 4, 5}).to(type);
    } else {
      t = at::randint(-100, 100, {3, 4, 5}).to(type);
      if (type == at::kByte) t = at::randint(0, 255, {3, 4, 5}).to(type);
    }
    std::string name = std::string("t.") + c10::toString(type);
    // A non-contiguous view is made contiguous on the way out.
    ASSERT_TRUE(AddTensor(writer, name, t.transpose(0, 2)).ok());
    originals[name] = t.transpose(0, 2).contiguous();
  }
  ASSERT_TRUE(writer.Write(dir.file("t.safetensors")).ok());
  auto file = SafetensorsFile::Open(dir.file("t.safetensors"));
  ASSERT_TRUE(file.ok()) << file.status();
  for (const auto& [name, expected] : originals) {
    auto loaded = LoadTensor(**file, name);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    EXPECT_EQ(loaded->scalar_type(), expected.scalar_type()) << name;
    EXPECT_EQ(loaded->sizes(), expected.sizes()) << name;
    EXPECT_TRUE(at::equal(*loaded, expected)) << name;
  }
  // BF16 values come back bit for bit (a float round trip is the identity on them).
  auto bf = LoadTensor(**file, "t.BFloat16");
  ASSERT_TRUE(bf.ok());
  EXPECT_TRUE(at::equal(bf->to(at::kFloat).to(at::kBFloat16), *bf));
}

TEST(TorchTensorsTest, LoadsFromCheckpointAndTheFixture) {
  const char* env = std::getenv("CROSSDIFF_FIXTURES");
  std::string dir =
      std::string(env != nullptr ? env : CROSSDIFF_SOURCE_DIR "/../shared/fixtures") + "/hf/llama";
  auto ckpt = Checkpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  auto t = LoadTensor(**ckpt, "model.layers.0.self_attn.q_proj.weight");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->sizes(), at::IntArrayRef({64, 64}));
  EXPECT_NEAR(t->to(at::kDouble).sum().item<double>(), 6.11042763505975, 1e-9);
  EXPECT_FLOAT_EQ(t->index({0, 1}).item<float>(), -0.2709688f);
  auto missing = LoadTensor(**ckpt, "nope");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("no tensor named 'nope'"));
}

TEST(TorchTensorsTest, BorrowReadsTheMappingAndCopiesWhenUnaligned) {
  ScratchDir dir;
  SafetensorsWriter w;
  const float aligned[3] = {1.5f, -2.0f, 3.25f};
  const uint8_t one_byte[1] = {7};
  const float unaligned[2] = {4.0f, -5.5f};
  // Data section order = insertion order: "a" at offset 0, "b" at 12, "c" at 13 (not a multiple
  // of 4, so "c" cannot be read in place as float32).
  ASSERT_TRUE(w.Add("a", DType::kF32, {3}, aligned, sizeof aligned).ok());
  ASSERT_TRUE(w.Add("b", DType::kU8, {1}, one_byte, 1).ok());
  ASSERT_TRUE(w.Add("c", DType::kF32, {2}, unaligned, sizeof unaligned).ok());
  ASSERT_TRUE(w.Write(dir.file("t.safetensors")).ok());
  auto file = SafetensorsFile::Open(dir.file("t.safetensors"));
  ASSERT_TRUE(file.ok()) << file.status();

  auto a = BorrowTensor(**file, *(*file)->Get("a").value());
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->data_ptr(), static_cast<const void*>((*file)->data(*(*file)->Get("a").value())));
  EXPECT_TRUE(at::equal(*a, at::tensor({1.5f, -2.0f, 3.25f})));

  const TensorInfo& c_info = *(*file)->Get("c").value();
  ASSERT_NE(reinterpret_cast<uintptr_t>((*file)->data(c_info)) % sizeof(float), 0u);
  auto c = BorrowTensor(**file, c_info);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_NE(c->data_ptr(), static_cast<const void*>((*file)->data(c_info)));
  EXPECT_TRUE(at::equal(*c, at::tensor({4.0f, -5.5f})));

  auto ckpt = Checkpoint::Open(dir.file("t.safetensors"));
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  auto b = BorrowTensor(**ckpt, "b");
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->scalar_type(), at::kByte);
  EXPECT_EQ(b->item<uint8_t>(), 7);
  EXPECT_EQ(BorrowTensor(**ckpt, "nope").status().code(), absl::StatusCode::kNotFound);
}

TEST(TorchTensorsTest, RejectsInvalidBoolBytes) {
  ScratchDir dir;
  SafetensorsWriter w;
  uint8_t bytes[2] = {1, 5};
  ASSERT_TRUE(w.Add("mask", DType::kBool, {2}, bytes, 2).ok());
  ASSERT_TRUE(w.Write(dir.file("b.safetensors")).ok());
  auto file = SafetensorsFile::Open(dir.file("b.safetensors"));
  ASSERT_TRUE(file.ok());
  auto t = LoadTensor(**file, "mask");
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(t.status().message()), HasSubstr("tensor 'mask': BOOL byte 1 holds 5"));
}

TEST(TorchTensorsTest, UnsupportedScalarTypeIsRejected) {
  SafetensorsWriter w;
  absl::Status s = AddTensor(w, "c", at::zeros({2}, at::kComplexFloat));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("has no safetensors equivalent"));
}

}  // namespace
}  // namespace crossdiff::tensor_io
