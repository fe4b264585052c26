// The NCCL backend: nccl.h collectives on CUDA tensors, the ncclUniqueId passed through the
// rendezvous store. Compiled only when CUDA and NCCL are found (CROSSDIFF_HAVE_NCCL).
// Internal to crossdiff_comm; callers use Connect() (connect.h).
//
// Streams: collectives run on a stream of our own created with default flags, so it orders itself
// after work queued on the legacy default stream (where LibTorch queues by default) and each call
// waits for its collective to finish before returning. Waits poll ncclCommGetAsyncError and
// cudaStreamQuery and abort the NCCL communicator (ncclCommAbort) when the timeout passes.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "core/comm/communicator.h"
#include "core/comm/rendezvous.h"

namespace crossdiff::comm {

// Selects the device (options.device "cuda:N", else rank % device count), exchanges the unique id
// and initialises the NCCL communicator, all bounded by the rendezvous timeout.
// Errors: UNAVAILABLE (no usable GPU), DEADLINE_EXCEEDED (init did not finish), naming the rank.
absl::StatusOr<std::unique_ptr<Communicator>> MakeNcclCommunicator(
    std::unique_ptr<Rendezvous> rendezvous);

}  // namespace crossdiff::comm
