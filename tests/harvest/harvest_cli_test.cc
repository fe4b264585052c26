// `crossdiff harvest` as a user runs it: a real process, exit codes, the one-line error, the
// progress line.
#include <ATen/ATen.h>
#include <sys/wait.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "core/activations/manifest.h"
#include "core/activations/store.h"
#include "core/harvest/harvest.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/harvest/model_dirs.h"

namespace crossdiff::harvest {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::Not;

struct ProcessResult {
  int exit_code = -1;
  std::string out, err;
};

std::string ReadAll(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

ProcessResult Harvest(const std::string& args, const std::string& dir) {
  const std::string out = dir + "/stdout.txt", err = dir + "/stderr.txt";
  const std::string cmd = std::string(CROSSDIFF_BINARY_DIR) + "/bin/crossdiff harvest " + args +
                          " >" + out + " 2>" + err;
  ProcessResult r;
  int status = std::system(cmd.c_str());
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.out = ReadAll(out);
  r.err = ReadAll(err);
  return r;
}

class HarvestCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = (fs::path(::testing::TempDir()) / "crossdiff_harvest_cli_test").string();
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    finetune_ = dir_ + "/finetune";
    ASSERT_TRUE(testing::WritePerturbedCopy(testing::LlamaFixtureDir(), finetune_, 0.02, 7).ok());
    data_ = dir_ + "/tokens.safetensors";
    ASSERT_TRUE(
        testing::WriteTokensDataset(data_, at::randint(0, 512, {4, 16}, at::kLong), at::Tensor())
            .ok());
  }
  std::string Args(const std::string& extra) {
    return "--base " + testing::LlamaFixtureDir() + " --finetune " + finetune_ + " --data " +
           data_ + " " + extra;
  }
  std::string dir_, finetune_, data_;
};

TEST_F(HarvestCliTest, WritesAStoreAndShowsProgress) {
  ProcessResult r = Harvest(
      Args("--layer 2 --out " + dir_ + "/store --batch 2 --skip-first 1 --threads 1"), dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("wrote 60 rows (layer 2, d_model 64, float32)"));
  EXPECT_THAT(r.err, HasSubstr("[harvest] 60 tokens"));
  EXPECT_THAT(r.err, HasSubstr("tokens/s"));
  auto manifest = activations::Manifest::Load(dir_ + "/store");
  ASSERT_TRUE(manifest.ok()) << manifest.status();
  EXPECT_EQ(manifest->rows, 60);
}

TEST_F(HarvestCliTest, BadInputIsOneLineAndNonZeroExit) {
  ProcessResult r = Harvest(Args("--layer 7 --out " + dir_ + "/bad"), dir_);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("error: layer 7 is out of range"));
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_FALSE(fs::exists(dir_ + "/bad/manifest.json"));

  r = Harvest("--base x --layer 1", dir_);  // missing required flags
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("finetune"));
}

// Two local ranks, claiming chunks from the rendezvous store (the default) or with fixed halves:
// either way the store holds the single process's rows in its order.
TEST_F(HarvestCliTest, NprocTwoWritesTheSingleProcessStore) {
  ProcessResult one = Harvest(Args("--layer 1 --out " + dir_ + "/one --quiet --threads 1"), dir_);
  ASSERT_EQ(one.exit_code, 0) << one.err;
  auto a = activations::StoreReader::Open(dir_ + "/one");
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_EQ((*a)->manifest().rows, 64);
  auto ra = (*a)->ReadRows(0, 64);
  ASSERT_TRUE(ra.ok());
  for (const std::string flags : {"", " --fixed-ranges"}) {
    SCOPED_TRACE(flags);
    const std::string out = dir_ + (flags.empty() ? "/claimed" : "/fixed");
    ProcessResult two =
        Harvest(Args("--layer 1 --out " + out +
                     " --nproc 2 --batch 1 --rows-per-shard 16 --threads 1" + flags),
                dir_);
    ASSERT_EQ(two.exit_code, 0) << two.err;
    EXPECT_THAT(two.out, HasSubstr("from 2 ranks"));
    EXPECT_THAT(two.out, HasSubstr("tokens/s over all ranks (rank 0 "));
    auto b = activations::StoreReader::Open(out);
    ASSERT_TRUE(b.ok()) << b.status();
    ASSERT_EQ((*b)->manifest().rows, 64);
    auto rb = (*b)->ReadRows(0, 64);
    ASSERT_TRUE(rb.ok());
    EXPECT_TRUE(at::equal(ra->token_ids, rb->token_ids));
    EXPECT_TRUE(at::equal(ra->sequence_ids, rb->sequence_ids));
    EXPECT_TRUE(at::equal(ra->positions, rb->positions));
    EXPECT_TRUE(at::allclose(ra->activations, rb->activations, 0, 1e-5));
    // The parts say which chunks each rank took: all of them, once, between the two ranks.
    int64_t taken = 0, count = -1;
    for (int rank = 0; rank < 2; ++rank) {
      auto part = activations::Manifest::LoadFile(PartManifestPath(out, rank, 2));
      ASSERT_TRUE(part.ok()) << part.status();
      auto extra = nlohmann::json::parse(part->extra_json);
      taken += static_cast<int64_t>(extra["chunks"].size());
      count = extra["chunk_count"].get<int64_t>();
    }
    EXPECT_EQ(taken, count);
    EXPECT_EQ(count, flags.empty() ? 4 : 2);  // 4 sequences in batches of 1: chunks of 1
    EXPECT_THAT((*b)->manifest().shards[0].file,
                HasSubstr(flags.empty() ? ChunkShardPrefix(0) : ShardPrefix(0, 2)));
  }
}

}  // namespace
}  // namespace crossdiff::harvest
