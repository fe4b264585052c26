#include "core/comm/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <cstring>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "core/comm/collective_checks.h"

namespace crossdiff::comm {
namespace {

constexpr char kUniqueIdKey[] = "crossdiff/nccl/unique_id";
using Clock = std::chrono::steady_clock;

absl::StatusOr<ncclDataType_t> ToNccl(int rank, at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return ncclFloat32;
    case at::kDouble:
      return ncclFloat64;
    case at::kHalf:
      return ncclFloat16;
    case at::kBFloat16:
      return ncclBfloat16;
    case at::kInt:
      return ncclInt32;
    case at::kLong:
      return ncclInt64;
    case at::kChar:
      return ncclInt8;
    case at::kByte:
      return ncclUint8;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("rank ", rank, ": nccl: unsupported dtype ", c10::toString(t)));
  }
}

ncclRedOp_t ToNccl(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return ncclSum;
    case ReduceOp::kMax:
      return ncclMax;
    case ReduceOp::kMin:
      return ncclMin;
  }
  return ncclSum;
}

// Polls a non-blocking NCCL communicator until its pending operation left ncclInProgress.
ncclResult_t WaitForComm(ncclComm_t comm, Clock::time_point deadline, bool* timed_out) {
  *timed_out = false;
  while (true) {
    ncclResult_t state = ncclSuccess;
    ncclResult_t r = ncclCommGetAsyncError(comm, &state);
    if (r != ncclSuccess) return r;
    if (state != ncclInProgress) return state;
    if (Clock::now() > deadline) {
      *timed_out = true;
      return ncclInProgress;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(std::unique_ptr<Rendezvous> rendezvous, int device, ncclComm_t comm,
                   cudaStream_t stream, void* barrier_buffer)
      : rendezvous_(std::move(rendezvous)),
        device_(device),
        comm_(comm),
        stream_(stream),
        barrier_buffer_(barrier_buffer) {}

  ~NcclCommunicator() override {
    cudaSetDevice(device_);
    if (comm_ != nullptr) {
      if (broken_.ok()) {
        ncclCommDestroy(comm_);
      } else {
        ncclCommAbort(comm_);
      }
    }
    cudaStreamDestroy(stream_);
    cudaFree(barrier_buffer_);
  }

  absl::StatusOr<int64_t> AddToCounter(const std::string& name, int64_t delta) override {
    return rendezvous_->AddToCounter(name, delta);
  }
  int rank() const override { return rendezvous_->options().rank; }
  int world_size() const override { return rendezvous_->options().world_size; }
  std::string backend() const override { return "nccl"; }
  int64_t bytes_communicated() const override { return bytes_; }
  double seconds_in_collectives() const override { return waited_; }

  absl::Status AllReduce(at::Tensor& t, ReduceOp op) override {
    if (absl::Status s = Check("AllReduce", t); !s.ok()) return s;
    absl::StatusOr<ncclDataType_t> type = ToNccl(rank(), t.scalar_type());
    if (!type.ok()) return type.status();
    return Run("AllReduce", RingAllReduceBytes(t.nbytes(), world_size()), [&] {
      return ncclAllReduce(t.data_ptr(), t.data_ptr(), t.numel(), *type, ToNccl(op), comm_,
                           stream_);
    });
  }

  absl::Status AllGather(const at::Tensor& in, at::Tensor& out) override {
    if (absl::Status s = Check("AllGather", in); !s.ok()) return s;
    if (absl::Status s = Check("AllGather", out); !s.ok()) return s;
    if (absl::Status s = CheckBlockedPair(rank(), world_size(), "AllGather", in, out); !s.ok()) {
      return s;
    }
    absl::StatusOr<ncclDataType_t> type = ToNccl(rank(), in.scalar_type());
    if (!type.ok()) return type.status();
    return Run("AllGather", RingAllGatherBytes(in.nbytes(), world_size()), [&] {
      return ncclAllGather(in.data_ptr(), out.data_ptr(), in.numel(), *type, comm_, stream_);
    });
  }

  absl::Status ReduceScatter(const at::Tensor& in, at::Tensor& out, ReduceOp op) override {
    if (absl::Status s = Check("ReduceScatter", in); !s.ok()) return s;
    if (absl::Status s = Check("ReduceScatter", out); !s.ok()) return s;
    if (absl::Status s = CheckBlockedPair(rank(), world_size(), "ReduceScatter", out, in);
        !s.ok()) {
      return s;
    }
    absl::StatusOr<ncclDataType_t> type = ToNccl(rank(), in.scalar_type());
    if (!type.ok()) return type.status();
    return Run("ReduceScatter", RingReduceScatterBytes(in.nbytes(), world_size()), [&] {
      return ncclReduceScatter(in.data_ptr(), out.data_ptr(), out.numel(), *type, ToNccl(op), comm_,
                               stream_);
    });
  }

  absl::Status Broadcast(at::Tensor& t, int root) override {
    if (absl::Status s = Check("Broadcast", t); !s.ok()) return s;
    if (root < 0 || root >= world_size()) {
      return absl::InvalidArgumentError(absl::StrCat("rank ", rank(), ": Broadcast: root ", root,
                                                     " is outside [0, ", world_size(), ")"));
    }
    absl::StatusOr<ncclDataType_t> type = ToNccl(rank(), t.scalar_type());
    if (!type.ok()) return type.status();
    return Run("Broadcast", rank() == root ? t.nbytes() : 0, [&] {
      return ncclBroadcast(t.data_ptr(), t.data_ptr(), t.numel(), *type, root, comm_, stream_);
    });
  }

  absl::Status Barrier() override {
    // NCCL has no barrier: an all-reduce of one float completes only when every rank joined it.
    return Run("Barrier", 0, [&] {
      return ncclAllReduce(barrier_buffer_, barrier_buffer_, 1, ncclFloat32, ncclSum, comm_,
                           stream_);
    });
  }

 private:
  absl::Status Check(const char* what, const at::Tensor& t) {
    if (absl::Status s = CheckCollectiveTensor(rank(), what, t, at::kCUDA); !s.ok()) return s;
    if (t.device().index() != device_) {
      return absl::InvalidArgumentError(absl::StrCat("rank ", rank(), ": ", what,
                                                     ": tensor on cuda:", t.device().index(),
                                                     ", communicator on cuda:", device_));
    }
    return absl::OkStatus();
  }

  // Enqueues one collective and polls until the stream has run it, NCCL reports an error, or the
  // timeout passes (then the communicator is aborted, so no kernel is left waiting on a peer).
  template <typename Launch>
  absl::Status Run(const char* what, int64_t bytes, Launch&& launch) {
    const Clock::time_point begin = Clock::now();
    absl::Status status = RunUntimed(what, bytes, std::forward<Launch>(launch));
    waited_ += std::chrono::duration<double>(Clock::now() - begin).count();
    return status;
  }

  template <typename Launch>
  absl::Status RunUntimed(const char* what, int64_t bytes, Launch&& launch) {
    if (!broken_.ok()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "rank ", rank(), ": ", what, " on a communicator broken by: ", broken_.message()));
    }
    ++seq_;
    rendezvous_->EnterCollective(seq_);
    cudaSetDevice(device_);
    const Clock::time_point deadline = Clock::now() + rendezvous_->options().timeout;
    std::string error;
    bool timed_out = false;
    ncclResult_t r = launch();
    if (r == ncclInProgress) r = WaitForComm(comm_, deadline, &timed_out);
    if (r == ncclSuccess) {
      while (true) {
        ncclResult_t state = ncclSuccess;
        ncclCommGetAsyncError(comm_, &state);
        if (state != ncclSuccess && state != ncclInProgress) {
          r = state;
          break;
        }
        cudaError_t q = cudaStreamQuery(stream_);
        if (q == cudaSuccess) {
          bytes_ += bytes;
          return absl::OkStatus();
        }
        if (q != cudaErrorNotReady) {
          error = absl::StrCat("CUDA: ", cudaGetErrorString(q));
          break;
        }
        if (Clock::now() > deadline) {
          timed_out = true;
          break;
        }
        std::this_thread::sleep_for(std::chrono::microseconds(20));
      }
    }
    if (error.empty()) {
      error = timed_out ? std::string("timed out")
                        : absl::StrCat(ncclGetErrorString(r), ": ", ncclGetLastError(comm_));
    }
    ncclCommAbort(comm_);
    comm_ = nullptr;
    broken_ = rendezvous_->ExplainFailure(what, seq_, error, timed_out);
    return broken_;
  }

  std::unique_ptr<Rendezvous> rendezvous_;
  int device_;
  ncclComm_t comm_;
  cudaStream_t stream_;
  void* barrier_buffer_;
  int64_t seq_ = 0;
  int64_t bytes_ = 0;
  double waited_ = 0;  // seconds in Run
  absl::Status broken_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Communicator>> MakeNcclCommunicator(
    std::unique_ptr<Rendezvous> rendezvous) {
  const RendezvousOptions& o = rendezvous->options();
  const std::string me = absl::StrCat("rank ", o.rank, ": ");
  int count = 0;
  if (cudaError_t e = cudaGetDeviceCount(&count); e != cudaSuccess || count == 0) {
    return absl::UnavailableError(absl::StrCat(
        me, "nccl: no CUDA device (", e == cudaSuccess ? "0 devices" : cudaGetErrorString(e), ")"));
  }
  int device = o.rank % count;
  if (!o.device.empty()) {
    if (!absl::StartsWith(o.device, "cuda:") || !absl::SimpleAtoi(o.device.substr(5), &device) ||
        device < 0 || device >= count) {
      return absl::InvalidArgumentError(
          absl::StrCat(me, "device: '", o.device, "' is not cuda:N with N < ", count));
    }
  }
  if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) {
    return absl::UnavailableError(
        absl::StrCat(me, "cudaSetDevice(", device, "): ", cudaGetErrorString(e)));
  }

  // The unique id travels through the rendezvous store (DESIGN.md section 5).
  ncclUniqueId id;
  try {
    if (o.rank == 0) {
      if (ncclResult_t r = ncclGetUniqueId(&id); r != ncclSuccess) {
        return absl::UnavailableError(absl::StrCat(me, "ncclGetUniqueId: ", ncclGetErrorString(r)));
      }
      std::vector<uint8_t> bytes(reinterpret_cast<uint8_t*>(&id),
                                 reinterpret_cast<uint8_t*>(&id) + sizeof(id));
      rendezvous->store().set(kUniqueIdKey, bytes);
    } else {
      std::vector<uint8_t> bytes = rendezvous->store().get(kUniqueIdKey);
      if (bytes.size() != sizeof(id)) {
        return absl::InternalError(
            absl::StrCat(me, "nccl unique id has ", bytes.size(), " bytes, expected ", sizeof(id)));
      }
      std::memcpy(&id, bytes.data(), sizeof(id));
    }
  } catch (const c10::Error& e) {
    return absl::DeadlineExceededError(
        absl::StrCat(me, "nccl unique id exchange failed: ", e.what_without_backtrace()));
  }

  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // init and collectives return at once; we poll with a deadline
  ncclComm_t comm = nullptr;
  const Clock::time_point deadline = Clock::now() + o.timeout;
  ncclResult_t r = ncclCommInitRankConfig(&comm, o.world_size, id, o.rank, &config);
  bool timed_out = false;
  if (r == ncclInProgress) r = WaitForComm(comm, deadline, &timed_out);
  if (r != ncclSuccess) {
    std::string why = timed_out ? absl::StrCat("not all ", o.world_size, " ranks joined in time")
                                : std::string(ncclGetErrorString(r));
    if (comm != nullptr) ncclCommAbort(comm);
    std::string msg = absl::StrCat(me, "ncclCommInitRank: ", why);
    return timed_out ? absl::DeadlineExceededError(msg) : absl::UnavailableError(msg);
  }

  cudaStream_t stream = nullptr;
  void* barrier_buffer = nullptr;
  if (cudaError_t e = cudaStreamCreate(&stream); e != cudaSuccess) {
    ncclCommAbort(comm);
    return absl::UnavailableError(absl::StrCat(me, "cudaStreamCreate: ", cudaGetErrorString(e)));
  }
  cudaError_t alloc = cudaMalloc(&barrier_buffer, sizeof(float));
  if (alloc == cudaSuccess) alloc = cudaMemset(barrier_buffer, 0, sizeof(float));
  if (cudaError_t e = alloc; e != cudaSuccess) {
    ncclCommAbort(comm);
    cudaStreamDestroy(stream);
    return absl::UnavailableError(absl::StrCat(me, "cudaMalloc: ", cudaGetErrorString(e)));
  }
  return std::unique_ptr<Communicator>(
      new NcclCommunicator(std::move(rendezvous), device, comm, stream, barrier_buffer));
}

}  // namespace crossdiff::comm
