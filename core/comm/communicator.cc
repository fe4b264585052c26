#include "core/comm/communicator.h"

namespace crossdiff::comm {
namespace {

// A collective that ran to completion (successfully) when it was started.
class CompletedCollective final : public PendingCollective {
 public:
  absl::Status Wait() override { return absl::OkStatus(); }
};

}  // namespace

absl::StatusOr<std::unique_ptr<PendingCollective>> Communicator::StartAllReduce(at::Tensor& t,
                                                                                ReduceOp op) {
  absl::Status s = AllReduce(t, op);
  if (!s.ok()) return s;
  return std::unique_ptr<PendingCollective>(new CompletedCollective());
}

absl::StatusOr<std::unique_ptr<PendingCollective>> Communicator::StartAllGather(
    const at::Tensor& in, at::Tensor& out) {
  absl::Status s = AllGather(in, out);
  if (!s.ok()) return s;
  return std::unique_ptr<PendingCollective>(new CompletedCollective());
}

}  // namespace crossdiff::comm
