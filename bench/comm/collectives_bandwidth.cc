// Collective bandwidth of a communicator: time per AllReduce / AllGather / ReduceScatter of float32
// buffers from 4 KiB to 64 MiB, as algorithm bandwidth (buffer bytes / time) and bus bandwidth (the
// ring-model bytes each rank sends / time, comparable across world sizes as in nccl-tests).
//
//   bench_comm_collectives --nproc 2 [--backend gloo] [--max-mib 64] [--seconds 0.5]
//
// Rank 0 prints one line per collective and size.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "core/comm/launch.h"
#include "core/common/cli_args.h"
#include "core/common/compute_threads.h"

namespace {

using crossdiff::comm::Communicator;
using Clock = std::chrono::steady_clock;

}  // namespace

int main(int argc, char** argv) {
  crossdiff::CommandLine cl("bench_comm_collectives", "collective bandwidth of the communicator");
  double& max_mib = cl.AddDouble("max-mib", 64, "largest buffer in MiB");
  double& seconds = cl.AddDouble("seconds", 0.5, "minimum time measured per size");
  crossdiff::comm::LaunchFlags launch = crossdiff::comm::AddLaunchFlags(cl);
  if (int rc = cl.ParseOrExit(argc, argv); rc >= 0) return rc;
  auto launched = crossdiff::comm::MaybeLaunchLocal(launch);
  if (!launched.ok()) {
    std::fprintf(stderr, "error: %s\n", launched.status().ToString().c_str());
    return 1;
  }
  if (launched->has_value()) return **launched;
  crossdiff::SetComputeThreads(1);
  auto connected = crossdiff::comm::ConnectFromFlags(launch);
  if (!connected.ok()) {
    std::fprintf(stderr, "error: %s\n", connected.status().ToString().c_str());
    return 1;
  }
  Communicator& comm = **connected;
  const int w = comm.world_size();
  if (comm.rank() == 0) {
    std::printf("backend %s, world size %d, float32 buffers\n", comm.backend().c_str(), w);
    std::printf("%-14s %12s %12s %14s %14s\n", "collective", "bytes", "time/op us", "algbw GB/s",
                "busbw GB/s");
  }
  for (const char* op : {"AllReduce", "AllGather", "ReduceScatter"}) {
    for (int64_t bytes = 4096; bytes <= static_cast<int64_t>(max_mib * (1 << 20)); bytes *= 2) {
      const int64_t n = bytes / 4;
      at::Tensor buf = at::ones({n});
      at::Tensor big = at::ones({n * w});
      at::Tensor small = at::ones({n / w > 0 ? n / w : 1});
      auto run_once = [&]() -> absl::Status {
        if (op == std::string("AllReduce")) return comm.AllReduce(buf);
        if (op == std::string("AllGather")) return comm.AllGather(buf, big);
        return comm.ReduceScatter(buf.narrow(0, 0, small.numel() * w), small);
      };
      // Every rank runs the same number of iterations: rank 0 decides it and broadcasts it.
      if (absl::Status s = run_once(); !s.ok()) {
        std::fprintf(stderr, "error: %s\n", s.ToString().c_str());
        return 1;
      }
      at::Tensor iters = at::zeros({1}, at::kLong);
      {
        auto t0 = Clock::now();
        (void)run_once();
        double once = std::chrono::duration<double>(Clock::now() - t0).count();
        iters.fill_(std::max<int64_t>(3, static_cast<int64_t>(seconds / std::max(once, 1e-6))));
      }
      (void)comm.Broadcast(iters, 0);
      const int64_t count = iters.item<int64_t>();
      (void)comm.Barrier();
      auto start = Clock::now();
      for (int64_t i = 0; i < count; ++i) {
        if (absl::Status s = run_once(); !s.ok()) {
          std::fprintf(stderr, "error: %s\n", s.ToString().c_str());
          return 1;
        }
      }
      const double per_op = std::chrono::duration<double>(Clock::now() - start).count() / count;
      // Bus bandwidth: the bytes one rank sends under the ring model, per second.
      double moved = op == std::string("AllReduce")   ? 2.0 * bytes * (w - 1) / w
                     : op == std::string("AllGather") ? 1.0 * bytes * (w - 1)
                                                      : 1.0 * bytes * (w - 1) / w;
      double payload = op == std::string("AllGather") ? 1.0 * bytes * w : 1.0 * bytes;
      if (comm.rank() == 0) {
        std::printf("%-14s %12lld %12.1f %14.3f %14.3f\n", op, static_cast<long long>(bytes),
                    per_op * 1e6, payload / per_op / 1e9, moved / per_op / 1e9);
        std::fflush(stdout);
      }
    }
  }
  return 0;
}
