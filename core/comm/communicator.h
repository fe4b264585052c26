// Collectives behind one interface (DESIGN.md section 5): Gloo through c10d on CPU tensors, NCCL on
// CUDA tensors. Every collective is blocking for the caller and bounded by the communicator's
// timeout: a peer that died or hangs turns into DEADLINE_EXCEEDED / UNAVAILABLE naming the rank,
// never a silent hang. Tensors must be contiguous and on the backend's device.
//
// Not thread-safe: one thread issues collectives, in the same order on every rank.
#pragma once

#include <ATen/ATen.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace crossdiff::comm {

enum class ReduceOp { kSum, kMax, kMin };

// A collective in flight (Communicator::StartAllReduce). Wait() blocks until it has completed,
// bounded by the communicator's timeout, and returns its status (the same errors as the blocking
// call); later calls return that status again. Destroying a handle that was never waited for waits
// for it: the collective's tensor must outlive it either way. Not thread-safe.
class PendingCollective {
 public:
  virtual ~PendingCollective() = default;
  virtual absl::Status Wait() = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  virtual std::string backend() const = 0;  // "gloo", "nccl", "local"

  // In place: every rank ends with the reduction of all ranks' `t`.
  virtual absl::Status AllReduce(at::Tensor& t, ReduceOp op = ReduceOp::kSum) = 0;
  // Starts the same in-place all-reduce and returns while it runs, so that the caller can compute
  // meanwhile (gradient buckets reduced during the backward pass). `t` must stay alive and
  // untouched until the handle's Wait() returns. Counts as one collective in the rank's sequence:
  // every rank starts it at the same point, and collectives issued before its Wait() run after
  // it. Errors found before it runs (a bad tensor, a broken communicator) come back here, errors
  // in flight from Wait(). Backends without asynchronous collectives run it to completion here
  // (the default).
  virtual absl::StatusOr<std::unique_ptr<PendingCollective>> StartAllReduce(
      at::Tensor& t, ReduceOp op = ReduceOp::kSum);
  // `out` is [world_size * in.numel()] laid out rank by rank (contiguous, same dtype).
  virtual absl::Status AllGather(const at::Tensor& in, at::Tensor& out) = 0;
  // AllGather, started as StartAllReduce is (`in` and `out` untouched until Wait() returns).
  virtual absl::StatusOr<std::unique_ptr<PendingCollective>> StartAllGather(const at::Tensor& in,
                                                                            at::Tensor& out);
  // `in` is [world_size * out.numel()]; rank r receives the reduction of block r.
  virtual absl::Status ReduceScatter(const at::Tensor& in, at::Tensor& out,
                                     ReduceOp op = ReduceOp::kSum) = 0;
  // In place: every rank ends with `root`'s `t`.
  virtual absl::Status Broadcast(at::Tensor& t, int root) = 0;
  virtual absl::Status Barrier() = 0;

  // Atomically adds `delta` to the integer counter `name` shared by every rank of this
  // communicator (0 until first added to) and returns its new value. Not a collective: ranks call
  // it independently and in any order, e.g. to claim the next piece of work (the sharded
  // harvest's chunks). Bounded by the timeout; UNAVAILABLE naming the rank when the store that
  // holds the counters (rank 0's rendezvous store) cannot be reached.
  virtual absl::StatusOr<int64_t> AddToCounter(const std::string& name, int64_t delta) = 0;

  // Bytes this rank has sent into collectives so far (for the benchmarks' per-step figures).
  virtual int64_t bytes_communicated() const = 0;
  // Wall seconds this rank has spent blocked in collectives so far (transfer plus waiting for
  // slower peers; the benchmarks' per-step figure). 0 where the backend does not measure it.
  virtual double seconds_in_collectives() const { return 0; }
};

// The trivial single-process communicator (world size 1): every collective is the identity.
std::unique_ptr<Communicator> MakeLocalCommunicator();

}  // namespace crossdiff::comm
