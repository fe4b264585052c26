#include "core/comm/gloo_communicator.h"

#include <algorithm>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "core/comm/collective_checks.h"
#include "core/common/status_macros.h"

namespace crossdiff::comm {
namespace {

c10d::ReduceOp ToC10d(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return c10d::ReduceOp::SUM;
    case ReduceOp::kMax:
      return c10d::ReduceOp::MAX;
    case ReduceOp::kMin:
      return c10d::ReduceOp::MIN;
  }
  return c10d::ReduceOp::SUM;
}

bool IsLoopback(const std::string& host) {
  return host == "localhost" || absl::StartsWith(host, "127.") || host == "::1";
}

constexpr int64_t kAllGatherPieceBytes = 8 << 20;

std::string FirstLine(std::string msg) {
  if (auto nl = msg.find('\n'); nl != std::string::npos) msg.resize(nl);
  return msg;
}

class GlooCommunicator final : public Communicator {
  // c10d's handle of a launched collective (its type differs between LibTorch 1.x and 2.x).
  using WorkPtr = decltype(std::declval<c10d::ProcessGroupGloo&>().barrier());
  using LaunchFn = std::function<WorkPtr()>;

 public:
  GlooCommunicator(std::unique_ptr<Rendezvous> rendezvous,
                   c10::intrusive_ptr<c10d::ProcessGroupGloo> group)
      : rendezvous_(std::move(rendezvous)), group_(std::move(group)) {}

  ~GlooCommunicator() override {
    // The group's threads go before the store they were set up with.
    group_.reset();
    rendezvous_.reset();
  }

  absl::StatusOr<int64_t> AddToCounter(const std::string& name, int64_t delta) override {
    return rendezvous_->AddToCounter(name, delta);
  }
  int rank() const override { return rendezvous_->options().rank; }
  int world_size() const override { return rendezvous_->options().world_size; }
  std::string backend() const override { return "gloo"; }
  int64_t bytes_communicated() const override { return bytes_; }
  double seconds_in_collectives() const override { return waited_; }

  absl::Status AllReduce(at::Tensor& t, ReduceOp op) override {
    if (absl::Status s = CheckCollectiveTensor(rank(), "AllReduce", t, at::kCPU); !s.ok()) return s;
    if (NeedsWidening(t)) {
      at::Tensor wide = t.to(at::kFloat);
      if (absl::Status s = AllReduce(wide, op); !s.ok()) return s;
      t.copy_(wide);
      return absl::OkStatus();
    }
    return Run("AllReduce", RingAllReduceBytes(t.nbytes(), world_size()), LaunchAllReduce(t, op));
  }

  absl::StatusOr<std::unique_ptr<PendingCollective>> StartAllReduce(at::Tensor& t,
                                                                    ReduceOp op) override {
    if (NeedsWidening(t)) return Communicator::StartAllReduce(t, op);  // widened, blocking
    if (absl::Status s = CheckCollectiveTensor(rank(), "AllReduce", t, at::kCPU); !s.ok()) return s;
    return StartPending("AllReduce", RingAllReduceBytes(t.nbytes(), world_size()),
                        LaunchAllReduce(t, op));
  }

  absl::Status AllGather(const at::Tensor& in, at::Tensor& out) override {
    if (absl::Status s = CheckAllGather(in, out); !s.ok()) return s;
    if (NeedsWidening(in)) {
      at::Tensor wide_out = at::empty(out.sizes(), out.options().dtype(at::kFloat));
      if (absl::Status s = AllGather(in.to(at::kFloat), wide_out); !s.ok()) return s;
      out.copy_(wide_out);
      return absl::OkStatus();
    }
    ASSIGN_OR_RETURN(std::unique_ptr<PendingCollective> pending, StartAllGatherPieces(in, out));
    return pending->Wait();
  }

  absl::StatusOr<std::unique_ptr<PendingCollective>> StartAllGather(const at::Tensor& in,
                                                                    at::Tensor& out) override {
    if (NeedsWidening(in)) return Communicator::StartAllGather(in, out);  // widened, blocking
    if (absl::Status s = CheckAllGather(in, out); !s.ok()) return s;
    return StartAllGatherPieces(in, out);
  }

  absl::Status ReduceScatter(const at::Tensor& in, at::Tensor& out, ReduceOp op) override {
    if (absl::Status s = CheckCollectiveTensor(rank(), "ReduceScatter", in, at::kCPU); !s.ok()) {
      return s;
    }
    if (absl::Status s = CheckCollectiveTensor(rank(), "ReduceScatter", out, at::kCPU); !s.ok()) {
      return s;
    }
    if (absl::Status s = CheckBlockedPair(rank(), world_size(), "ReduceScatter", out, in);
        !s.ok()) {
      return s;
    }
    if (NeedsWidening(in)) {
      at::Tensor wide_out = at::empty(out.sizes(), out.options().dtype(at::kFloat));
      if (absl::Status s = ReduceScatter(in.to(at::kFloat), wide_out, op); !s.ok()) return s;
      out.copy_(wide_out);
      return absl::OkStatus();
    }
    // Gloo has no reduce-scatter: an all-to-all delivers block r of every rank to rank r (the
    // bandwidth a ring reduce-scatter needs), then rank r reduces the W blocks locally.
    at::Tensor received = at::empty({world_size(), out.numel()}, in.options());
    absl::Status s = Run("ReduceScatter", RingReduceScatterBytes(in.nbytes(), world_size()), [&] {
      at::Tensor flat_in = in.reshape({in.numel()});
      at::Tensor flat_received = received.view({received.numel()});
      std::vector<int64_t> equal_splits;
      return group_->alltoall_base(flat_received, flat_in, equal_splits, equal_splits);
    });
    if (!s.ok()) return s;
    at::Tensor reduced;
    switch (op) {
      case ReduceOp::kSum:
        reduced = received.sum(0, false, out.scalar_type());
        break;
      case ReduceOp::kMax:
        reduced = std::get<0>(received.max(0));
        break;
      case ReduceOp::kMin:
        reduced = std::get<0>(received.min(0));
        break;
    }
    out.view({out.numel()}).copy_(reduced);
    return absl::OkStatus();
  }

  absl::Status Broadcast(at::Tensor& t, int root) override {
    if (absl::Status s = CheckCollectiveTensor(rank(), "Broadcast", t, at::kCPU); !s.ok()) return s;
    if (root < 0 || root >= world_size()) {
      return absl::InvalidArgumentError(absl::StrCat("rank ", rank(), ": Broadcast: root ", root,
                                                     " is outside [0, ", world_size(), ")"));
    }
    if (NeedsWidening(t)) {
      at::Tensor wide = t.to(at::kFloat);
      if (absl::Status s = Broadcast(wide, root); !s.ok()) return s;
      t.copy_(wide);
      return absl::OkStatus();
    }
    return Run("Broadcast", rank() == root ? t.nbytes() : 0, [&] {
      std::vector<at::Tensor> tensors{t};
      c10d::BroadcastOptions opts;
      opts.rootRank = root;
      return group_->broadcast(tensors, opts);
    });
  }

  absl::Status Barrier() override {
    return Run("Barrier", 0, [&] { return group_->barrier(); });
  }

 private:
  // Gloo (as of LibTorch 1.13) has no bfloat16 kernels: such tensors travel as float32, which holds
  // every bfloat16 value exactly (sums are rounded once, at the end).
  static bool NeedsWidening(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16; }

  absl::Status CheckAllGather(const at::Tensor& in, const at::Tensor& out) const {
    if (absl::Status s = CheckCollectiveTensor(rank(), "AllGather", in, at::kCPU); !s.ok()) {
      return s;
    }
    if (absl::Status s = CheckCollectiveTensor(rank(), "AllGather", out, at::kCPU); !s.ok()) {
      return s;
    }
    return CheckBlockedPair(rank(), world_size(), "AllGather", in, out);
  }

  // The c10d calls of the collectives that also run asynchronously (tensors already checked).
  LaunchFn LaunchAllReduce(const at::Tensor& t, ReduceOp op) {
    return [this, t, op] {
      std::vector<at::Tensor> tensors{t};
      c10d::AllreduceOptions opts;
      opts.reduceOp = ToC10d(op);
      return group_->allreduce(tensors, opts);
    };
  }
  // Elements [offset, offset + count) of every rank's block.
  LaunchFn LaunchAllGather(const at::Tensor& in, const at::Tensor& out, int64_t offset,
                           int64_t count) {
    return [this, in, out, offset, count] {
      // Gloo gathers into a flat buffer, then copies each block into these views of `out`.
      std::vector<at::Tensor> blocks;
      at::Tensor flat_out = out.view({world_size(), in.numel()});
      for (int r = 0; r < world_size(); ++r) blocks.push_back(flat_out[r].narrow(0, offset, count));
      std::vector<std::vector<at::Tensor>> outputs{blocks};
      std::vector<at::Tensor> inputs{in.reshape({in.numel()}).narrow(0, offset, count)};
      return group_->allgather(outputs, inputs);
    };
  }

  // An all-gather of more than kAllGatherPieceBytes per rank goes as several all-gathers of at
  // most that much, all launched at once. Gloo sends a rank's whole block as one message, and
  // over loopback TCP a block of 16 MiB took 180 ms where 8 MiB took 12 ms, and 16 MiB in pieces
  // 16 ms (bench_comm_collectives, docs/distributed.md). Smaller blocks go whole: splitting them
  // showed no gain.
  absl::StatusOr<std::unique_ptr<PendingCollective>> StartAllGatherPieces(const at::Tensor& in,
                                                                          const at::Tensor& out) {
    const int64_t n = in.numel();
    const int64_t per_piece = std::max<int64_t>(1, kAllGatherPieceBytes / in.element_size());
    auto pending = std::make_unique<Pending>(this, "AllGather");
    int64_t offset = 0;
    do {  // an empty block is one empty all-gather
      const int64_t count = std::min(per_piece, n - offset);
      absl::StatusOr<WorkPtr> work = Start("AllGather", LaunchAllGather(in, out, offset, count));
      if (!work.ok()) return work.status();  // the pieces already launched are dropped with it
      pending->Add(*std::move(work), seq_,
                   RingAllGatherBytes(count * in.element_size(), world_size()));
      offset += count;
    } while (offset < n);
    return std::unique_ptr<PendingCollective>(std::move(pending));
  }

  // Collectives Gloo runs on its own threads (one, or the pieces of one); Wait() finishes them in
  // launch order as Run() does, and stops at the first failure (which breaks the communicator).
  class Pending final : public PendingCollective {
   public:
    Pending(GlooCommunicator* comm, const char* what) : comm_(comm), what_(what) {}
    Pending(GlooCommunicator* comm, const char* what, WorkPtr work, int64_t seq, int64_t bytes)
        : comm_(comm), what_(what) {
      Add(std::move(work), seq, bytes);
    }
    ~Pending() override { (void)Wait(); }
    void Add(WorkPtr work, int64_t seq, int64_t bytes) {
      launched_.push_back({std::move(work), seq, bytes});
    }
    absl::Status Wait() override {
      for (; next_ < launched_.size(); ++next_) {
        Launched& l = launched_[next_];
        if (status_.ok()) status_ = comm_->Finish(what_, l.seq, l.bytes, l.work);
        l.work.reset();
      }
      return status_;
    }

   private:
    struct Launched {
      WorkPtr work;
      int64_t seq, bytes;
    };
    GlooCommunicator* comm_;
    const char* what_;
    std::vector<Launched> launched_;
    size_t next_ = 0;
    absl::Status status_;
  };

  // Launches one collective (numbered in this rank's sequence; the heartbeat says which one this
  // rank is in, for the failure messages of rendezvous.h).
  template <typename Launch>
  absl::StatusOr<WorkPtr> Start(const char* what, Launch&& launch) {
    if (!broken_.ok()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "rank ", rank(), ": ", what, " on a communicator broken by: ", broken_.message()));
    }
    ++seq_;
    rendezvous_->EnterCollective(seq_);
    try {
      return WorkPtr(launch());
    } catch (const c10::Error& e) {
      return Fail(what, seq_, FirstLine(e.what_without_backtrace()));
    } catch (const std::exception& e) {
      return Fail(what, seq_, FirstLine(e.what()));
    }
  }

  // Waits for a launched collective, bounded by the timeout both in Gloo's own transport and in
  // the wait.
  absl::Status Finish(const char* what, int64_t seq, int64_t bytes, const WorkPtr& work) {
    const absl::Time begin = absl::Now();
    absl::Status status;
    try {
      work->wait(rendezvous_->options().timeout);
      bytes_ += bytes;
    } catch (const c10::Error& e) {
      status = Fail(what, seq, FirstLine(e.what_without_backtrace()));
    } catch (const std::exception& e) {
      status = Fail(what, seq, FirstLine(e.what()));
    }
    waited_ += absl::ToDoubleSeconds(absl::Now() - begin);
    return status;
  }

  // The first failure breaks the communicator: the ranks' collective sequences no longer line
  // up, so later calls fail fast with the original error.
  absl::Status Fail(const char* what, int64_t seq, const std::string& error) {
    if (!broken_.ok()) return broken_;
    const bool timed_out = absl::StrContains(absl::AsciiStrToLower(error), "timed out") ||
                           absl::StrContains(absl::AsciiStrToLower(error), "timeout");
    broken_ = rendezvous_->ExplainFailure(what, seq, error, timed_out);
    return broken_;
  }

  // Launches one collective and returns its handle.
  template <typename Launch>
  absl::StatusOr<std::unique_ptr<PendingCollective>> StartPending(const char* what, int64_t bytes,
                                                                  Launch&& launch) {
    absl::StatusOr<WorkPtr> work = Start(what, std::forward<Launch>(launch));
    if (!work.ok()) return work.status();
    return std::unique_ptr<PendingCollective>(
        new Pending(this, what, *std::move(work), seq_, bytes));
  }

  // Launches one collective and waits for it.
  template <typename Launch>
  absl::Status Run(const char* what, int64_t bytes, Launch&& launch) {
    absl::StatusOr<WorkPtr> work = Start(what, std::forward<Launch>(launch));
    if (!work.ok()) return work.status();
    return Finish(what, seq_, bytes, *work);
  }

  std::unique_ptr<Rendezvous> rendezvous_;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> group_;
  int64_t seq_ = 0;
  int64_t bytes_ = 0;
  double waited_ = 0;  // seconds in Finish
  absl::Status broken_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Communicator>> MakeGlooCommunicator(
    std::unique_ptr<Rendezvous> rendezvous) {
  const RendezvousOptions& o = rendezvous->options();
  try {
    auto options = c10d::ProcessGroupGloo::Options::create(o.timeout);
    if (absl::StartsWith(o.device, "if:")) {
      options->devices.push_back(
          c10d::ProcessGroupGloo::createDeviceForInterface(o.device.substr(3)));
    } else if (!o.device.empty()) {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(o.device));
    } else if (IsLoopback(o.host)) {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    } else {
      options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    auto prefixed =
        c10::make_intrusive<c10d::PrefixStore>("crossdiff/gloo", rendezvous->store_ptr());
    auto group =
        c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, o.rank, o.world_size, options);
    return std::unique_ptr<Communicator>(
        new GlooCommunicator(std::move(rendezvous), std::move(group)));
  } catch (const c10::Error& e) {
    return absl::DeadlineExceededError(
        absl::StrCat("rank ", o.rank, ": connecting Gloo to the other ", o.world_size - 1,
                     " ranks failed: ", FirstLine(e.what_without_backtrace())));
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("rank ", o.rank, ": Gloo setup failed: ", e.what()));
  }
}

}  // namespace crossdiff::comm
