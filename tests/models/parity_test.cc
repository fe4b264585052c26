// Parity of CausalLM against the activations Hugging Face transformers 4.45.2 computed for the six
// tiny checkpoints in ../shared/fixtures/hf (atol = rtol = 1e-4, every position, pads included),
// plus truncation (capturing block L runs exactly L + 1 blocks) and padding (a padded row equals
// its unpadded run on real positions).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "core/models/causal_lm.h"
#include "tests/models/fixture_util.h"

namespace crossdiff::models {
namespace {

using testing::AllClose;
using testing::HfFixture;
using testing::LoadOrDie;

class ParityTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    auto model = CausalLM::Load(HfFixture(GetParam()));
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
    auto file = tensor_io::SafetensorsFile::Open(HfFixture(GetParam()) + "/expected.safetensors");
    ASSERT_TRUE(file.ok()) << file.status();
    expected_ = std::move(*file);
    ids_ = LoadOrDie(*expected_, "input_ids");
    mask_ = LoadOrDie(*expected_, "attention_mask");
  }
  std::unique_ptr<CausalLM> model_;
  std::unique_ptr<tensor_io::SafetensorsFile> expected_;
  at::Tensor ids_, mask_;
};

TEST_P(ParityTest, AllOutputsMatchTransformers) {
  ForwardRequest req;
  req.all_hidden_states = req.last_block_output = req.logits = true;
  auto result = model_->Forward(ids_, mask_, req);
  ASSERT_TRUE(result.ok()) << result.status();
  const int64_t n = model_->config().num_layers;
  EXPECT_EQ(result->blocks_run, n);
  ASSERT_EQ(static_cast<int64_t>(result->hidden_states.size()), n + 1);
  for (int64_t i = 0; i <= n; ++i) {
    EXPECT_TRUE(AllClose(result->hidden_states[i],
                         LoadOrDie(*expected_, "hidden_states." + std::to_string(i))))
        << GetParam() << " hidden_states." << i;
  }
  EXPECT_TRUE(AllClose(result->last_block_output, LoadOrDie(*expected_, "last_block_output")))
      << GetParam() << " last_block_output";
  EXPECT_TRUE(AllClose(result->logits, LoadOrDie(*expected_, "logits"))) << GetParam() << " logits";
}

TEST_P(ParityTest, CapturingBlockLRunsExactlyLPlusOneBlocks) {
  ForwardRequest full_req;
  full_req.all_hidden_states = full_req.last_block_output = true;
  auto full = model_->Forward(ids_, mask_, full_req);
  ASSERT_TRUE(full.ok()) << full.status();
  const int n = static_cast<int>(model_->config().num_layers);
  for (int layer = 0; layer < n; ++layer) {
    ForwardRequest req;
    req.capture_blocks = {layer};
    auto r = model_->Forward(ids_, mask_, req);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->blocks_run, layer + 1) << "layer " << layer;
    EXPECT_TRUE(r->hidden_states.empty());
    EXPECT_FALSE(r->logits.defined());
    const at::Tensor& want =
        layer == n - 1 ? full->last_block_output : full->hidden_states[layer + 1];
    ASSERT_EQ(r->block_outputs.count(layer), 1u);
    EXPECT_TRUE(at::equal(r->block_outputs.at(layer), want)) << "layer " << layer;
    // And against Hugging Face's numbers.
    const std::string name =
        layer == n - 1 ? "last_block_output" : "hidden_states." + std::to_string(layer + 1);
    EXPECT_TRUE(AllClose(r->block_outputs.at(layer), LoadOrDie(*expected_, name)));
    auto residual = model_->ResidualAfterBlock(ids_, mask_, layer);
    ASSERT_TRUE(residual.ok()) << residual.status();
    EXPECT_TRUE(at::equal(*residual, want));
  }
}

TEST_P(ParityTest, SeveralCapturesInOneForward) {
  ForwardRequest req;
  req.capture_blocks = {1, 0};
  auto r = model_->Forward(ids_, mask_, req);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->blocks_run, 2);
  ASSERT_EQ(r->block_outputs.size(), 2u);
  EXPECT_TRUE(AllClose(r->block_outputs.at(0), LoadOrDie(*expected_, "hidden_states.1")));
  EXPECT_TRUE(AllClose(r->block_outputs.at(1), LoadOrDie(*expected_, "hidden_states.2")));
}

TEST_P(ParityTest, PaddedRowEqualsUnpaddedRunOnRealPositions) {
  // Row 1 has 19 real tokens then 5 pads.
  const int64_t real = mask_[1].sum().item<int64_t>();
  ASSERT_EQ(real, 19);
  ForwardRequest req;
  req.all_hidden_states = req.logits = true;
  auto padded = model_->Forward(ids_, mask_, req);
  ASSERT_TRUE(padded.ok()) << padded.status();
  at::Tensor ids = ids_.narrow(0, 1, 1).narrow(1, 0, real).contiguous();
  auto alone = model_->Forward(ids, at::ones_like(ids), req);
  ASSERT_TRUE(alone.ok()) << alone.status();
  for (size_t i = 0; i < padded->hidden_states.size(); ++i) {
    EXPECT_TRUE(AllClose(padded->hidden_states[i].narrow(0, 1, 1).narrow(1, 0, real),
                         alone->hidden_states[i], 1e-5, 1e-5))
        << "hidden_states." << i;
  }
  EXPECT_TRUE(
      AllClose(padded->logits.narrow(0, 1, 1).narrow(1, 0, real), alone->logits, 1e-5, 1e-5));
}

TEST_P(ParityTest, Int32IdsGiveTheSameResult) {
  ForwardRequest req;
  req.logits = true;
  auto a = model_->Forward(ids_, mask_, req);
  auto b = model_->Forward(ids_.to(at::kInt), mask_.to(at::kInt), req);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_TRUE(at::equal(a->logits, b->logits));
}

// Load(..., last_block) keeps blocks 0..last_block only: the residual stream after each of them is
// bit for bit the full model's, and requests that need a later block are refused.
TEST_P(ParityTest, ModelLoadedUpToABlockMatchesTheFullModel) {
  const int n = static_cast<int>(model_->config().num_layers);
  for (int layer = 0; layer < n; ++layer) {
    auto truncated = CausalLM::Load(HfFixture(GetParam()), at::kCPU, std::nullopt, layer);
    ASSERT_TRUE(truncated.ok()) << truncated.status();
    auto want = model_->ResidualAfterBlock(ids_, mask_, layer);
    auto got = (*truncated)->ResidualAfterBlock(ids_, mask_, layer);
    ASSERT_TRUE(want.ok() && got.ok()) << got.status();
    EXPECT_TRUE(at::equal(*got, *want)) << GetParam() << " layer " << layer;
    ForwardRequest logits;
    logits.logits = true;
    // Refused even at layer n - 1: every block is there, but not the final norm or the head.
    auto refused = (*truncated)->Forward(ids_, mask_, logits);
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(std::string(refused.status().message()),
                ::testing::HasSubstr("loaded up to block " + std::to_string(layer) + " only"));
    if (layer == n - 1) continue;
    auto later = (*truncated)->ResidualAfterBlock(ids_, mask_, layer + 1);
    EXPECT_EQ(later.status().code(), absl::StatusCode::kFailedPrecondition);
  }
}

INSTANTIATE_TEST_SUITE_P(HfFixtures, ParityTest,
                         ::testing::Values("gpt2", "llama", "mistral", "qwen2", "gemma", "gemma2"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

// CPU float32 runs its projections through oneDNN when LibTorch has it; the plain at::linear path
// (CROSSDIFF_ONEDNN=0, and every LibTorch without oneDNN) must match too.
TEST(PlainLinearParityTest, MatchesTransformersWithoutOneDnn) {
  ::setenv("CROSSDIFF_ONEDNN", "0", 1);
  for (const std::string arch : {"gpt2", "llama", "mistral", "qwen2", "gemma", "gemma2"}) {
    auto model = CausalLM::Load(HfFixture(arch));
    ASSERT_TRUE(model.ok()) << model.status();
    auto file = tensor_io::SafetensorsFile::Open(HfFixture(arch) + "/expected.safetensors");
    ASSERT_TRUE(file.ok());
    ForwardRequest req;
    req.all_hidden_states = req.logits = true;
    auto r =
        (*model)->Forward(LoadOrDie(**file, "input_ids"), LoadOrDie(**file, "attention_mask"), req);
    ASSERT_TRUE(r.ok()) << r.status();
    for (size_t i = 0; i < r->hidden_states.size(); ++i) {
      EXPECT_TRUE(
          AllClose(r->hidden_states[i], LoadOrDie(**file, "hidden_states." + std::to_string(i))))
          << arch << " hidden_states." << i;
    }
    EXPECT_TRUE(AllClose(r->logits, LoadOrDie(**file, "logits"))) << arch;
  }
  ::unsetenv("CROSSDIFF_ONEDNN");
}

// The bfloat16 path (the CUDA default) run on CPU: float32 softmax and norms, bf16 everything else.
// bfloat16 keeps 8 mantissa bits, so only a loose bound holds; it still catches semantic mistakes
// (a wrong norm, scale or mask moves values by O(1)).
TEST(Bfloat16ParityTest, TracksTransformersOnCpu) {
  for (const std::string arch : {"gpt2", "llama", "mistral", "qwen2", "gemma", "gemma2"}) {
    auto model = CausalLM::Load(HfFixture(arch), at::kCPU, at::kBFloat16);
    ASSERT_TRUE(model.ok()) << model.status();
    auto file = tensor_io::SafetensorsFile::Open(HfFixture(arch) + "/expected.safetensors");
    ASSERT_TRUE(file.ok());
    ForwardRequest req;
    req.all_hidden_states = req.logits = true;
    auto r =
        (*model)->Forward(LoadOrDie(**file, "input_ids"), LoadOrDie(**file, "attention_mask"), req);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->hidden_states[1].scalar_type(), at::kBFloat16);
    EXPECT_EQ(r->logits.scalar_type(), at::kFloat);
    for (size_t i = 0; i < r->hidden_states.size(); ++i) {
      EXPECT_TRUE(AllClose(r->hidden_states[i],
                           LoadOrDie(**file, "hidden_states." + std::to_string(i)), 0.15, 0.05))
          << arch << " hidden_states." << i;
    }
    EXPECT_TRUE(AllClose(r->logits, LoadOrDie(**file, "logits"), 0.15, 0.05)) << arch;
  }
}

TEST(ConcurrencyTest, ConcurrentForwardsAgree) {
  auto model = CausalLM::Load(HfFixture("gemma2"));
  ASSERT_TRUE(model.ok()) << model.status();
  auto file = tensor_io::SafetensorsFile::Open(HfFixture("gemma2") + "/expected.safetensors");
  ASSERT_TRUE(file.ok());
  const at::Tensor ids = LoadOrDie(**file, "input_ids"), mask = LoadOrDie(**file, "attention_mask");
  ForwardRequest req;
  req.logits = true;
  std::vector<at::Tensor> logits(4);
  std::vector<std::thread> threads;
  for (size_t t = 0; t < logits.size(); ++t) {
    threads.emplace_back([&, t] {
      auto r = (*model)->Forward(ids, mask, req);
      if (r.ok()) logits[t] = r->logits;
    });
  }
  for (auto& t : threads) t.join();
  for (const auto& l : logits) {
    ASSERT_TRUE(l.defined());
    EXPECT_TRUE(AllClose(l, LoadOrDie(**file, "logits")));
  }
}

TEST(CudaParityTest, Bfloat16OnCudaTracksFloat32Reference) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  for (const std::string arch : {"llama", "gemma2", "gpt2"}) {
    auto model = CausalLM::Load(HfFixture(arch), at::Device("cuda:0"));
    ASSERT_TRUE(model.ok()) << model.status();
    EXPECT_EQ((*model)->dtype(), at::kBFloat16);
    auto file = tensor_io::SafetensorsFile::Open(HfFixture(arch) + "/expected.safetensors");
    ASSERT_TRUE(file.ok());
    ForwardRequest req;
    req.all_hidden_states = true;
    auto r =
        (*model)->Forward(LoadOrDie(**file, "input_ids"), LoadOrDie(**file, "attention_mask"), req);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->hidden_states[1].scalar_type(), at::kBFloat16);
    // bfloat16 keeps 8 bits of mantissa: a loose bound still catches any semantic mistake.
    EXPECT_TRUE(AllClose(r->hidden_states[2], LoadOrDie(**file, "hidden_states.2"), 0.15, 0.05))
        << arch;
  }
}

}  // namespace
}  // namespace crossdiff::models
