// World size 1: every collective is the identity (after the same argument checks as the real
// backends, so single-process runs catch the mistakes a distributed run would).
#include <map>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/comm/collective_checks.h"
#include "core/comm/communicator.h"

namespace crossdiff::comm {
namespace {

class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  std::string backend() const override { return "local"; }
  int64_t bytes_communicated() const override { return 0; }

  absl::Status AllReduce(at::Tensor& t, ReduceOp) override { return Check("AllReduce", t); }
  absl::Status AllGather(const at::Tensor& in, at::Tensor& out) override {
    if (absl::Status s = Check("AllGather", in); !s.ok()) return s;
    if (absl::Status s = CheckBlockedPair(0, 1, "AllGather", in, out); !s.ok()) return s;
    if (!out.is_same(in)) out.view({out.numel()}).copy_(in.reshape({in.numel()}));
    return absl::OkStatus();
  }
  absl::Status ReduceScatter(const at::Tensor& in, at::Tensor& out, ReduceOp) override {
    if (absl::Status s = Check("ReduceScatter", in); !s.ok()) return s;
    if (absl::Status s = CheckBlockedPair(0, 1, "ReduceScatter", out, in); !s.ok()) return s;
    if (!out.is_same(in)) out.view({out.numel()}).copy_(in.reshape({in.numel()}));
    return absl::OkStatus();
  }
  absl::Status Broadcast(at::Tensor& t, int root) override {
    if (root != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("rank 0: Broadcast: root ", root, " is outside [0, 1)"));
    }
    return Check("Broadcast", t);
  }
  absl::Status Barrier() override { return absl::OkStatus(); }
  absl::StatusOr<int64_t> AddToCounter(const std::string& name, int64_t delta) override {
    return counters_[name] += delta;
  }

 private:
  static absl::Status Check(const char* what, const at::Tensor& t) {
    if (!t.defined()) {
      return absl::InvalidArgumentError(absl::StrCat("rank 0: ", what, ": undefined tensor"));
    }
    if (!t.is_contiguous()) {
      return absl::InvalidArgumentError(
          absl::StrCat("rank 0: ", what, ": tensor must be contiguous"));
    }
    return absl::OkStatus();
  }
  std::map<std::string, int64_t> counters_;
};

}  // namespace

std::unique_ptr<Communicator> MakeLocalCommunicator() {
  return std::make_unique<LocalCommunicator>();
}

}  // namespace crossdiff::comm
