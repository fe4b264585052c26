#include "core/comm/collective_checks.h"

#include <sstream>

#include "absl/strings/str_cat.h"

namespace crossdiff::comm {

absl::Status CheckCollectiveTensor(int rank, const std::string& what, const at::Tensor& t,
                                   at::DeviceType device) {
  if (!t.defined()) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank ", rank, ": ", what, ": undefined tensor"));
  }
  if (t.device().type() != device) {
    std::ostringstream os;
    os << "rank " << rank << ": " << what << ": tensor on " << t.device() << ", backend needs "
       << device;
    return absl::InvalidArgumentError(os.str());
  }
  if (!t.is_contiguous()) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank ", rank, ": ", what, ": tensor must be contiguous"));
  }
  return absl::OkStatus();
}

absl::Status CheckBlockedPair(int rank, int world_size, const std::string& what,
                              const at::Tensor& small, const at::Tensor& large) {
  if (small.scalar_type() != large.scalar_type()) {
    return absl::InvalidArgumentError(absl::StrCat("rank ", rank, ": ", what, ": dtypes differ (",
                                                   c10::toString(small.scalar_type()), " vs ",
                                                   c10::toString(large.scalar_type()), ")"));
  }
  if (large.numel() != small.numel() * world_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank ", rank, ": ", what, ": the large tensor has ", large.numel(),
                     " elements, expected world_size (", world_size, ") x ", small.numel()));
  }
  return absl::OkStatus();
}

int64_t RingAllReduceBytes(int64_t bytes, int world_size) {
  return 2 * bytes * (world_size - 1) / world_size;
}
int64_t RingAllGatherBytes(int64_t bytes_in, int world_size) { return bytes_in * (world_size - 1); }
int64_t RingReduceScatterBytes(int64_t bytes_in, int world_size) {
  return bytes_in * (world_size - 1) / world_size;
}

}  // namespace crossdiff::comm
