// The one entry point that turns rendezvous options into a Communicator (DESIGN.md section 5).
//
//   RendezvousOptions o;  o.backend = "gloo"; o.rank = r; o.world_size = w;
//   o.host = "10.0.0.1"; o.port = 29500; o.timeout = std::chrono::seconds(60);
//   ASSIGN_OR_RETURN(std::unique_ptr<Communicator> comm, Connect(o));
//
// Blocks until every rank has joined (bounded by `timeout`). Rank 0 hosts the c10d::TCPStore for
// as long as its communicator lives, so it must outlive the other ranks' last collective.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "core/comm/communicator.h"
#include "core/comm/rendezvous_options.h"

namespace crossdiff::comm {

// Errors (each message starts with "rank R: "): INVALID_ARGUMENT for bad options;
// DEADLINE_EXCEEDED when the store is unreachable or a rank never joins (naming it);
// UNIMPLEMENTED for a backend this build lacks ("nccl" without CUDA, "gloo" without Gloo headers);
// UNAVAILABLE when the GPU or port is unusable. backend "local" (world size 1) needs no store at
// all.
absl::StatusOr<std::unique_ptr<Communicator>> Connect(const RendezvousOptions& options);

// True when this build contains the NCCL backend (CUDA + NCCL found).
bool HaveNcclBackend();
// True when this build contains the Gloo backend (Gloo headers found: libgloo-dev).
bool HaveGlooBackend();

}  // namespace crossdiff::comm
