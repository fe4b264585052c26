// Rendezvous through a c10d::TCPStore hosted by rank 0 (DESIGN.md section 5), plus the liveness
// bookkeeping that lets a failed collective name the rank responsible.
//
// Join protocol (keys live under "crossdiff/"):
//   rank 0 binds HOST:PORT (PORT 0 = any free port; `on_store_bound` learns the real one) and
//   publishes the world size; every rank adds 1 to "join/<rank>" (a second join of the same rank is
//   an error) and waits until all ranks have joined. A rank that never joins turns into
//   DEADLINE_EXCEEDED naming the missing ranks.
//
// Liveness: after joining, a background thread writes "hb/<rank>" = "<collective seq> <tick>" every
// heartbeat interval. When a collective fails, `ExplainFailure` reads the peers' heartbeats twice
// and names the rank whose tick stopped (process died or frozen), whose sequence number lags (it
// never entered the collective: hangs or diverged), or that already closed its communicator.
//
// Thread-safety: `EnterCollective` and `ExplainFailure` are called from the one thread that issues
// collectives; the heartbeat thread is internal.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/comm/rendezvous_options.h"

namespace crossdiff::comm {

class Rendezvous {
 public:
  // Connects to (rank 0: hosts) the store, runs the join protocol and starts the heartbeat.
  // Errors: DEADLINE_EXCEEDED (store unreachable or a rank never joined, naming it),
  // ALREADY_EXISTS (two processes claimed one rank), FAILED_PRECONDITION (world size mismatch),
  // UNAVAILABLE (could not bind the port). Every message starts with "rank R: ".
  static absl::StatusOr<std::unique_ptr<Rendezvous>> Join(const RendezvousOptions& options);

  // Marks this rank as closed for peers' diagnostics and stops the heartbeat. Rank 0 (the store
  // host) first waits, bounded by about two diagnosis windows, until every peer has closed.
  ~Rendezvous();

  Rendezvous(const Rendezvous&) = delete;
  Rendezvous& operator=(const Rendezvous&) = delete;

  // The store, shared with backends (they prefix their keys). Lives as long as this object.
  c10d::Store& store();
  const c10::intrusive_ptr<c10d::Store>& store_ptr() const;
  const RendezvousOptions& options() const { return options_; }
  int bound_port() const { return bound_port_; }

  // Communicator::AddToCounter: adds `delta` to the store key "crossdiff/counter/<name>" (atomic
  // in the store) and returns the new value. UNAVAILABLE "rank R: ..." when the store is gone.
  absl::StatusOr<int64_t> AddToCounter(const std::string& name, int64_t delta);

  // Records that this rank is entering collective number `seq` (1, 2, ...): published with the
  // next heartbeat.
  void EnterCollective(int64_t seq) { seq_.store(seq); }

  // Turns a backend failure of collective `seq` (`what`, e.g. "AllReduce") into a Status naming
  // the peer that caused it when the heartbeats identify one; `raw` is the backend's message.
  // `timed_out` picks DEADLINE_EXCEEDED over UNAVAILABLE when no peer is identified.
  // Takes a few heartbeat intervals (it watches whether peers are still ticking).
  absl::Status ExplainFailure(const std::string& what, int64_t seq, const std::string& raw,
                              bool timed_out);

  std::chrono::milliseconds heartbeat_interval() const { return heartbeat_interval_; }
  // How long ExplainFailure watches the peers' heartbeats: max(5 intervals, 1 s).
  std::chrono::milliseconds DiagnosisWindow() const;
  std::chrono::milliseconds join_timeout() const {
    return options_.join_timeout.count() > 0 ? options_.join_timeout : options_.timeout;
  }

 private:
  explicit Rendezvous(const RendezvousOptions& options);
  absl::Status Connect();
  absl::Status WaitForAllRanks();
  void HeartbeatLoop();

  RendezvousOptions options_;
  int bound_port_ = 0;
  std::chrono::milliseconds heartbeat_interval_;
  struct Stores;                    // c10d objects, kept out of this header
  std::unique_ptr<Stores> stores_;  // the main client (rank 0: also the server) + heartbeat client

  std::atomic<int64_t> seq_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread heartbeat_;
};

}  // namespace crossdiff::comm
