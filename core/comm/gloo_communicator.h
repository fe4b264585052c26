// The Gloo backend: c10d::ProcessGroupGloo on CPU tensors, over the rendezvous store of
// rendezvous.h. Internal to crossdiff_comm; callers use Connect() (connect.h).
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "core/comm/communicator.h"
#include "core/comm/rendezvous.h"

namespace crossdiff::comm {

// Builds the process group (its own full-mesh connection setup is bounded by the rendezvous
// timeout). Takes ownership of `rendezvous`. Errors name this rank.
absl::StatusOr<std::unique_ptr<Communicator>> MakeGlooCommunicator(
    std::unique_ptr<Rendezvous> rendezvous);

}  // namespace crossdiff::comm
