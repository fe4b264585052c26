// One WatchJob stream (callback API): stored events from `from_sequence` on, then live ones, one
// write in flight at a time (back-pressure: a slow client only delays itself; events wait in the
// job store, not in memory). Ends OK after the job's terminal event, UNAVAILABLE on coordinator
// shutdown.
//
// Owns itself: deleted in OnDone. Thread-safe against concurrent OnEvents and gRPC reactions.
#pragma once

#include <grpcpp/grpcpp.h>

#include <deque>
#include <mutex>
#include <string>

#include "crossdiff/v1/job.pb.h"
#include "server/event_hub.h"
#include "server/scheduler.h"

namespace crossdiff::server {

class WatchJobReactor : public grpc::ServerWriteReactor<v1::JobEvent>, public EventSubscriber {
 public:
  // The caller has checked that the job exists and belongs to the caller's team.
  WatchJobReactor(Scheduler* scheduler, EventHub* hub, const v1::Job& job, int64_t from_sequence);

  void OnEvents(const std::vector<v1::JobEvent>& events) override;
  void OnShutdown() override;
  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

 private:
  // Starts the next write, re-reads the store after a gap, or finishes; never blocks on the
  // network.
  void Pump();
  void FinishOnce(const grpc::Status& status);  // requires mu_ held

  Scheduler* const scheduler_;
  EventHub* const hub_;
  const std::string job_id_;
  bool subscribed_ = false;

  std::mutex mu_;
  int64_t have_upto_;               // highest sequence written, in flight or queued
  std::deque<v1::JobEvent> queue_;  // contiguous sequences after the one in flight
  bool need_reload_ = true;         // the store holds events we have not queued
  bool writing_ = false;
  bool finished_ = false;
  bool terminal_sent_ = false;
  v1::JobEvent current_;  // the event being written (must outlive the write)
};

// True for the event that makes a job succeeded, failed or cancelled (a job's last event).
bool IsTerminalEvent(const v1::JobEvent& event);

}  // namespace crossdiff::server
