// Argument checks and byte accounting shared by the backends (the same rules for every backend).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

#include "absl/status/status.h"

namespace crossdiff::comm {

// INVALID_ARGUMENT naming `what` and the rank unless `t` is defined, contiguous and on `device`.
absl::Status CheckCollectiveTensor(int rank, const std::string& what, const at::Tensor& t,
                                   at::DeviceType device);

// AllGather/ReduceScatter shape rules: the large tensor holds world_size blocks of the small one's
// element count, with the same dtype.
absl::Status CheckBlockedPair(int rank, int world_size, const std::string& what,
                              const at::Tensor& small, const at::Tensor& large);

// Bytes one rank sends under the ring model of each collective (what a bandwidth-optimal algorithm
// sends): the figure `Communicator::bytes_communicated` accumulates.
int64_t RingAllReduceBytes(int64_t bytes, int world_size);
int64_t RingAllGatherBytes(int64_t bytes_in, int world_size);
int64_t RingReduceScatterBytes(int64_t bytes_in, int world_size);

}  // namespace crossdiff::comm
