// Where and how a process joins a distributed run (DESIGN.md section 5). Plain data: no LibTorch.
#pragma once

#include <chrono>
#include <functional>
#include <string>

#include "absl/status/status.h"

namespace crossdiff::comm {

struct RendezvousOptions {
  std::string backend = "gloo";  // "gloo" (CPU tensors), "nccl" (CUDA tensors) or "local" (world 1)
  int rank = 0;
  int world_size = 1;
  // Address of rank 0's TCPStore. Rank 0 binds it; port 0 binds any free port (then only
  // `on_store_bound` learns which one, so ranks > 0 need another way to be told: see launch.h).
  std::string host = "127.0.0.1";
  int port = 0;
  // Bounds every wait: each collective, connection setup, NCCL initialisation.
  std::chrono::milliseconds timeout{std::chrono::seconds(300)};
  // Bounds reaching the store and waiting for every rank to join (processes may start slowly, so
  // it is often longer than `timeout`); zero = `timeout`.
  std::chrono::milliseconds join_timeout{0};
  // gloo: the hostname or IP whose interface carries collectives ("if:NAME" = network interface
  // NAME); empty = loopback when `host` is a loopback address, else this machine's hostname.
  // nccl: "cuda:N"; empty = cuda:(rank % device count).
  std::string device;
  // Called once on rank 0 after the store is bound, with the bound port, before waiting for the
  // other ranks. Must not block for long.
  std::function<void(int port)> on_store_bound;
};

// Validates rank/world size/host/port/backend; INVALID_ARGUMENT naming the field.
absl::Status ValidateRendezvousOptions(const RendezvousOptions& options);

}  // namespace crossdiff::comm
