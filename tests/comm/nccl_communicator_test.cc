// The NCCL communicator on real GPUs: one rank per device (up to 2), as threads of this process.
// Skips itself without a GPU. Buffers are cudaMalloc'ed and wrapped with at::from_blob so the test
// also runs against a CPU-only LibTorch (only the data pointer and metadata are used).
#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <future>
#include <vector>

#include "core/comm/connect.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace crossdiff::comm {
namespace {

int DeviceCount() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

at::Tensor DeviceFloats(int device, const std::vector<float>& host) {
  cudaSetDevice(device);
  void* ptr = nullptr;
  EXPECT_EQ(cudaMalloc(&ptr, host.size() * sizeof(float)), cudaSuccess);
  cudaMemcpy(ptr, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice);
  return at::for_blob(ptr, {static_cast<int64_t>(host.size())})
      .deleter([device](void* p) {
        cudaSetDevice(device);
        cudaFree(p);
      })
      .options(at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, device))
      .target_device(at::Device(at::kCUDA, device))
      .make_tensor();
}

std::vector<float> ToHost(const at::Tensor& t) {
  std::vector<float> host(t.numel());
  cudaMemcpy(host.data(), t.data_ptr(), t.nbytes(), cudaMemcpyDeviceToHost);
  return host;
}

absl::Status RunRank(int rank, int world, int port, std::promise<int>* bound) {
  RendezvousOptions o;
  o.backend = "nccl";
  o.rank = rank;
  o.world_size = world;
  o.port = port;
  o.device = "cuda:" + std::to_string(rank);
  o.timeout = std::chrono::seconds(60);
  if (bound != nullptr) o.on_store_bound = [bound](int p) { bound->set_value(p); };
  absl::StatusOr<std::unique_ptr<Communicator>> comm = Connect(o);
  if (!comm.ok()) return comm.status();
  Communicator& c = **comm;
  const float w = static_cast<float>(world);
  at::Tensor t = DeviceFloats(rank, {1.0f + rank, 2.0f + rank});
  if (absl::Status s = c.AllReduce(t); !s.ok()) return s;
  const float ranks = w * (w - 1) / 2;
  if (ToHost(t) != std::vector<float>{w + ranks, 2 * w + ranks}) {
    return absl::InternalError("AllReduce values");
  }
  at::Tensor in = DeviceFloats(rank, {static_cast<float>(rank)});
  at::Tensor out = DeviceFloats(rank, std::vector<float>(world, -1.0f));
  if (absl::Status s = c.AllGather(in, out); !s.ok()) return s;
  for (int q = 0; q < world; ++q) {
    if (ToHost(out)[q] != q) return absl::InternalError("AllGather values");
  }
  at::Tensor rs_in = DeviceFloats(rank, std::vector<float>(world, 1.0f));
  at::Tensor rs_out = DeviceFloats(rank, {0.0f});
  if (absl::Status s = c.ReduceScatter(rs_in, rs_out); !s.ok()) return s;
  if (ToHost(rs_out)[0] != w) return absl::InternalError("ReduceScatter values");
  at::Tensor b = DeviceFloats(rank, {static_cast<float>(rank)});
  if (absl::Status s = c.Broadcast(b, world - 1); !s.ok()) return s;
  if (ToHost(b)[0] != w - 1) return absl::InternalError("Broadcast values");
  return c.Barrier();
}

TEST(NcclCommunicatorTest, CollectivesOnEveryAvailableGpu) {
  const int devices = DeviceCount();
  if (devices == 0) GTEST_SKIP() << "no CUDA device";
  const int world = devices >= 2 ? 2 : 1;
  std::promise<int> port;
  auto rank0 = std::async(std::launch::async, [&] { return RunRank(0, world, 0, &port); });
  std::vector<std::future<absl::Status>> others;
  if (world > 1) {
    const int p = port.get_future().get();
    for (int r = 1; r < world; ++r) {
      others.push_back(
          std::async(std::launch::async, [=] { return RunRank(r, world, p, nullptr); }));
    }
  }
  EXPECT_TRUE(rank0.get().ok());
  for (auto& f : others) {
    absl::Status s = f.get();
    EXPECT_TRUE(s.ok()) << s;
  }
}

TEST(NcclCommunicatorTest, CpuTensorIsRejectedNamingTheRank) {
  if (DeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  RendezvousOptions o;
  o.backend = "nccl";
  o.timeout = std::chrono::seconds(30);
  absl::StatusOr<std::unique_ptr<Communicator>> comm = Connect(o);
  ASSERT_TRUE(comm.ok()) << comm.status();
  at::Tensor cpu = at::ones({3});
  absl::Status s = (*comm)->AllReduce(cpu);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), ::testing::HasSubstr("rank 0: AllReduce: tensor on cpu"));
}

}  // namespace
}  // namespace crossdiff::comm
