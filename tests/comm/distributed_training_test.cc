// Distributed training (issue 4) with real processes on 127.0.0.1: with the same global batch and
// seed, 2 Gloo ranks end where 1 rank ends after 200 steps (weights within 1e-3 relative for
// ReLU-L1, final FVU within 2% for BatchTopK), data-parallel and latent-sharded; checkpoints move
// between sharded and unsharded runs (and world sizes) in both directions.
#include <ATen/ATen.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/crosscoder/crosscoder.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/comm/rank_runner.h"

namespace crossdiff::comm {
namespace {

using ::crossdiff::comm::testing::RankRun;
using ::crossdiff::comm::testing::RunRanks;

std::string TrainBinary() { return std::string(CROSSDIFF_BINARY_DIR) + "/tests/dp_train_rank"; }

class DataParallelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::path(::testing::TempDir()) /
           ("comm_dp_" + std::to_string(getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  // Trains with `nproc` ranks into dir_/<name>; returns the output directory.
  std::string Train(int nproc, const std::string& arch, const std::string& name,
                    const std::string& sharding = "data", std::vector<std::string> extra = {}) {
    std::string out = (dir_ / name).string();
    std::vector<std::string> args = {"--arch",         arch,  "--out",  out, "--steps",    "200",
                                     "--batch",        "256", "--seed", "7", "--sharding", sharding,
                                     "--comm-timeout", "120"};
    args.insert(args.end(), extra.begin(), extra.end());
    RankRun run = RunRanks(nproc, args, true, TrainBinary());
    if (std::find(extra.begin(), extra.end(), "--stop-after") != extra.end()) {
      EXPECT_EQ(run.result.failed_rank, -1) << run.result.failure << "\n" << run.All(0);
      return out;
    }
    EXPECT_EQ(run.result.failed_rank, -1) << run.result.failure << "\n" << run.All(0) << run.All(1);
    EXPECT_THAT(run.Line(0, "TRAIN_OK"), ::testing::HasSubstr("steps=200")) << run.All(0);
    return out;
  }

  static nlohmann::json Metrics(const std::string& dir) {
    std::ifstream in(dir + "/train_metrics.json");
    return nlohmann::json::parse(in);
  }

  // The AuxK runs of both modes: the one-rank run had dead latents, the other run counts the same
  // dead latents and reaches the same FVU per model (within 2%).
  static void ExpectAuxKRunMatches(const std::string& one_dir, const std::string& other_dir) {
    nlohmann::json m1 = Metrics(one_dir), m2 = Metrics(other_dir);
    bool aux_active = false;
    for (const auto& rec : m1["history"]) aux_active |= rec["aux_loss"].get<double>() > 0;
    EXPECT_TRUE(aux_active) << "the test needs dead latents";
    EXPECT_EQ(m2["dead_latents"], m1["dead_latents"]);
    for (int m = 0; m < 2; ++m) {
      const double f1 = m1["fvu"][m], f2 = m2["fvu"][m];
      EXPECT_NEAR(f2, f1, 0.02 * f1) << "model " << m;
    }
  }

  std::filesystem::path dir_;
};

double RelativeDifference(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).norm().item<double>() / std::max(a.norm().item<double>(), 1e-12);
}

void ExpectSameWeights(const std::string& want_dir, const std::string& got_dir) {
  auto a = crosscoder::Crosscoder::Load(want_dir);
  auto b = crosscoder::Crosscoder::Load(got_dir);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_LT(RelativeDifference(a->W_enc(), b->W_enc()), 1e-3);
  EXPECT_LT(RelativeDifference(a->W_dec(), b->W_dec()), 1e-3);
  EXPECT_LT(RelativeDifference(a->b_enc(), b->b_enc()), 1e-3);
  EXPECT_LT(RelativeDifference(a->b_dec(), b->b_dec()), 1e-3);
}

TEST_F(DataParallelTest, ReluL1TwoRanksEndWithTheWeightsOfOne) {
  std::string one = Train(1, "relu-l1", "one");
  std::string two = Train(2, "relu-l1", "two");
  EXPECT_EQ(Metrics(two)["world_size"], 2);
  ExpectSameWeights(one, two);
  // Buckets of 10 latents (320 floats; the last of the 64 latents' blocks holds 4): 16 all-reduces
  // (7 blocks of each matrix and the two biases) in flight during each backward pass, and the same
  // weights.
  ExpectSameWeights(one, Train(2, "relu-l1", "two_buckets", "data", {"--bucket-floats", "320"}));
  auto a = crosscoder::Crosscoder::Load(one);
  auto b = crosscoder::Crosscoder::Load(two);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_LT(RelativeDifference(a->activation_scale(), b->activation_scale()), 1e-6);
}

TEST_F(DataParallelTest, BatchTopKTwoRanksReachTheFvuOfOne) {
  std::string one = Train(1, "batch-topk", "one");
  std::string two = Train(2, "batch-topk", "two");
  nlohmann::json m1 = Metrics(one), m2 = Metrics(two);
  ASSERT_EQ(m1["fvu"].size(), 2u);
  ASSERT_EQ(m2["fvu"].size(), 2u);
  for (int m = 0; m < 2; ++m) {
    const double f1 = m1["fvu"][m], f2 = m2["fvu"][m];
    EXPECT_GT(f1, 0);
    EXPECT_LT(f1, 1);  // it learned something
    EXPECT_NEAR(f2, f1, 0.02 * f1) << "model " << m;
  }
  // Stronger than the 2% the issue asks for: the gathered factors give the global gradients.
  ExpectSameWeights(one, two);
}

// With AuxK engaged (over half the latents dead for most of the run): the ranks exchange the AuxK
// rows and codes too, and every rank computes the global batch's gradients, so the weights end
// where one rank's end.
TEST_F(DataParallelTest, BatchTopKWithAuxKTwoRanksEndWithTheWeightsOfOne) {
  const std::vector<std::string> aux = {"--dict-size", "256", "--k", "2", "--dead-tokens", "512"};
  std::string one = Train(1, "batch-topk", "one", "data", aux);
  std::string two = Train(2, "batch-topk", "two", "data", aux);
  ExpectAuxKRunMatches(one, two);
  ExpectSameWeights(one, two);
}

// A data-parallel BatchTopK run stopped at step 100 (its ranks had read step 100's batch ahead,
// during step 99's exchange) resumes on 2 ranks, or on 1, and ends where the uninterrupted run
// ends.
TEST_F(DataParallelTest, BatchTopKResumesOnTheSameOrAnotherNumberOfRanks) {
  std::string straight = Train(2, "batch-topk", "straight");
  std::string same = Train(2, "batch-topk", "same", "data", {"--stop-after", "100"});
  EXPECT_TRUE(std::filesystem::exists(same + "/checkpoint"));
  EXPECT_FALSE(std::filesystem::exists(same + "/crosscoder.safetensors"));
  Train(2, "batch-topk", "same", "data", {"--resume"});
  ExpectSameWeights(straight, same);
  std::string fewer = Train(2, "batch-topk", "fewer", "data", {"--stop-after", "100"});
  Train(1, "batch-topk", "fewer", "data", {"--resume"});
  ExpectSameWeights(straight, fewer);
}

}  // namespace
}  // namespace crossdiff::comm

namespace crossdiff::comm {
namespace {

using LatentShardedTest = DataParallelTest;

TEST_F(LatentShardedTest, ReluL1TwoShardsEndWithTheWeightsOfOneRank) {
  std::string one = Train(1, "relu-l1", "one");
  std::string sharded = Train(2, "relu-l1", "sharded", "latent");
  nlohmann::json m = Metrics(sharded);
  EXPECT_EQ(m["sharding"], "latent");
  EXPECT_EQ(m["latents_per_rank"], 32);
  ExpectSameWeights(one, sharded);
}

TEST_F(LatentShardedTest, BatchTopKTwoShardsReachTheFvuOfOneRank) {
  std::string one = Train(1, "batch-topk", "one");
  std::string sharded = Train(2, "batch-topk", "sharded", "latent");
  nlohmann::json m1 = Metrics(one), m2 = Metrics(sharded);
  for (int m = 0; m < 2; ++m) {
    const double f1 = m1["fvu"][m], f2 = m2["fvu"][m];
    EXPECT_LT(f1, 1);
    EXPECT_NEAR(f2, f1, 0.02 * f1) << "model " << m;
  }
  EXPECT_NEAR(m2["threshold"].get<double>(), m1["threshold"].get<double>(),
              0.02 * m1["threshold"].get<double>());
}

// AuxK (256 latents, k = 2, dead after 512 tokens: over half the latents are dead for most of the
// run): the per-token top-k over the dead latents is agreed across shards too.
TEST_F(LatentShardedTest, BatchTopKWithAuxKTwoShardsReachTheFvuOfOneRank) {
  const std::vector<std::string> aux = {"--dict-size", "256", "--k", "2", "--dead-tokens", "512"};
  std::string one = Train(1, "batch-topk", "one", "data", aux);
  std::string sharded = Train(2, "batch-topk", "sharded", "latent", aux);
  ExpectAuxKRunMatches(one, sharded);
}

// A sharded run's checkpoint resumes in an unsharded run (2 ranks -> 1), and an unsharded run's
// checkpoint in a sharded one (1 rank -> 2): both end where an uninterrupted run ends.
TEST_F(LatentShardedTest, CheckpointsMoveBetweenShardedAndUnshardedRuns) {
  std::string straight = Train(1, "relu-l1", "straight");
  std::string a = Train(2, "relu-l1", "sharded_then_unsharded", "latent", {"--stop-after", "100"});
  ASSERT_TRUE(std::filesystem::exists(a + "/checkpoint/trainer_state.json"));
  Train(1, "relu-l1", "sharded_then_unsharded", "data", {"--resume"});
  ExpectSameWeights(straight, a);

  std::string b = Train(1, "relu-l1", "unsharded_then_sharded", "data", {"--stop-after", "100"});
  ASSERT_TRUE(std::filesystem::exists(b + "/checkpoint/trainer_state.json"));
  Train(2, "relu-l1", "unsharded_then_sharded", "latent", {"--resume"});
  ExpectSameWeights(straight, b);
}

}  // namespace
}  // namespace crossdiff::comm
