// Data-parallel training semantics, with ranks as threads of this process and an in-test
// communicator (the real Gloo/NCCL runs are core/comm's tests): the global batch, the BatchTopK
// selection over it and the summed gradients make 2 ranks end where 1 rank ends.
#include <ATen/Parallel.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <condition_variable>
#include <filesystem>
#include <mutex>
#include <thread>

#include "core/comm/communicator.h"
#include "core/crosscoder/trainer.h"

namespace crossdiff::crosscoder {
namespace {

// Collectives between threads: every rank deposits its tensor, then each sums the deposits in rank
// order (so every rank gets bit-identical results).
class ThreadGroup {
 public:
  explicit ThreadGroup(int world) : world_(world), slots_(world) {}
  void Barrier() {
    std::unique_lock<std::mutex> lock(mu_);
    const int64_t gen = generation_;
    if (++arrived_ == world_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != gen; });
    }
  }
  int world_;
  std::vector<at::Tensor> slots_;
  std::mutex mu_;
  std::condition_variable cv_;
  int arrived_ = 0;
  int64_t generation_ = 0;
};

class ThreadCommunicator : public comm::Communicator {
 public:
  ThreadCommunicator(ThreadGroup* g, int rank) : g_(g), rank_(rank) {}
  int rank() const override { return rank_; }
  int world_size() const override { return g_->world_; }
  std::string backend() const override { return "test-threads"; }
  absl::Status AllReduce(at::Tensor& t, comm::ReduceOp op) override {
    g_->slots_[rank_] = t.clone();
    g_->Barrier();
    at::Tensor acc = g_->slots_[0].clone();
    for (int r = 1; r < g_->world_; ++r) {
      if (op == comm::ReduceOp::kSum) acc.add_(g_->slots_[r]);
      if (op == comm::ReduceOp::kMax) acc = at::maximum(acc, g_->slots_[r]);
      if (op == comm::ReduceOp::kMin) acc = at::minimum(acc, g_->slots_[r]);
    }
    g_->Barrier();
    t.copy_(acc);
    return absl::OkStatus();
  }
  absl::Status AllGather(const at::Tensor& in, at::Tensor& out) override {
    g_->slots_[rank_] = in.clone();
    g_->Barrier();
    for (int r = 0; r < g_->world_; ++r)
      out.narrow(0, r * in.numel(), in.numel()).copy_(g_->slots_[r].reshape({-1}));
    g_->Barrier();
    return absl::OkStatus();
  }
  absl::Status ReduceScatter(const at::Tensor&, at::Tensor&, comm::ReduceOp) override {
    return absl::UnimplementedError("not used");
  }
  absl::Status Broadcast(at::Tensor& t, int root) override {
    if (rank_ == root) g_->slots_[root] = t.clone();
    g_->Barrier();
    t.copy_(g_->slots_[root]);
    g_->Barrier();
    return absl::OkStatus();
  }
  absl::Status Barrier() override {
    g_->Barrier();
    return absl::OkStatus();
  }
  int64_t bytes_communicated() const override { return 0; }
  absl::StatusOr<int64_t> AddToCounter(const std::string&, int64_t) override {
    return absl::UnimplementedError("not used");
  }

 private:
  ThreadGroup* g_;
  int rank_;
};

at::Tensor MakeRows(int64_t n) {
  at::Generator gen = at::detail::createCPUGenerator(21);
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor dict = at::randn({24, 2, 8}, gen, f32);
  at::Tensor coef =
      at::rand({n, 24}, gen, f32) * (at::rand({n, 24}, gen, f32) < 0.15).to(at::kFloat);
  return at::einsum("nf,fmd->nmd", {coef, dict}) + 0.01 * at::randn({n, 2, 8}, gen, f32);
}

std::string TempDir(const std::string& name) {
  auto dir = std::filesystem::temp_directory_path() /
             ("crosscoder_dp_test_" + std::to_string(::getpid()) + "_" + name);
  std::filesystem::remove_all(dir);
  return dir.string();
}

// Trains with `world` thread ranks; returns rank 0's result and model.
std::pair<TrainResult, Crosscoder> Train(TrainOptions o, int world, const RowProvider& rows) {
  ThreadGroup group(world);
  std::vector<absl::StatusOr<TrainResult>> results(world, absl::UnknownError("not run"));
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      ThreadCommunicator comm(&group, r);
      results[r] = RunTrainingOnRows(o, rows, &comm, nullptr);
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < world; ++r)
    EXPECT_TRUE(results[r].ok()) << "rank " << r << ": " << results[r].status();
  auto model = Crosscoder::Load(o.out_dir);
  EXPECT_TRUE(model.ok()) << model.status();
  return {*results[0], *model};
}

double RelativeDifference(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).norm().item<double>() / std::max(1e-12, b.norm().item<double>());
}

TEST(DataParallelTest, TwoRanksEndWhereOneRankEnds) {
  at::set_num_threads(1);
  auto rows = MakeTensorRowProvider(MakeRows(4096));
  for (Architecture arch : {Architecture::kReluL1, Architecture::kBatchTopK}) {
    TrainOptions o;
    o.arch = arch;
    o.dict_size = 32;
    o.k = 4;
    o.steps = 100;
    o.batch_size = 64;
    o.lr = 2e-3;
    o.seed = 3;
    o.threads = 1;
    o.l1_coeff = 0.3;
    o.metrics_every = 50;
    o.checkpoint_every = 50;  // exercises the cross-rank weights checksum
    o.dead_tokens_threshold = 1024;
    o.out_dir = TempDir("one");
    auto [one, m1] = Train(o, 1, *rows);
    o.out_dir = TempDir("two");
    auto [two, m2] = Train(o, 2, *rows);
    const std::string what(ArchitectureName(arch));
    EXPECT_LT(RelativeDifference(m2.W_dec(), m1.W_dec()), 1e-3) << what;
    EXPECT_LT(RelativeDifference(m2.W_enc(), m1.W_enc()), 1e-3) << what;
    ASSERT_EQ(one.fvu.size(), 2u);
    for (int m = 0; m < 2; ++m)
      EXPECT_NEAR(two.fvu[m], one.fvu[m], 0.02 * one.fvu[m] + 1e-4) << what;
    EXPECT_NEAR(two.l0, one.l0, 0.05 * one.l0 + 1e-6) << what;
  }
}

}  // namespace
}  // namespace crossdiff::crosscoder
