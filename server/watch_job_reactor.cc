#include "server/watch_job_reactor.h"

#include <algorithm>
#include <utility>

#include "server/grpc_status.h"

namespace crossdiff::server {
namespace {
constexpr int kReloadBatch = 256;
}  // namespace

bool IsTerminalEvent(const v1::JobEvent& event) {
  return event.has_phase_change() && IsTerminal(event.phase_change().to());
}

WatchJobReactor::WatchJobReactor(Scheduler* scheduler, EventHub* hub, const v1::Job& job,
                                 int64_t from_sequence)
    : scheduler_(scheduler),
      hub_(hub),
      job_id_(job.id()),
      have_upto_(std::max<int64_t>(1, from_sequence) - 1) {
  if (IsTerminal(job.state()) && have_upto_ >= job.last_event_sequence()) {
    // Nothing left to send: the client already saw the terminal event.
    std::lock_guard<std::mutex> lock(mu_);
    FinishOnce(grpc::Status::OK);
    return;
  }
  // Subscribe before reading the store, so no event can fall between the two.
  subscribed_ = hub_->Subscribe(job_id_, this);
  if (!subscribed_) {
    std::lock_guard<std::mutex> lock(mu_);
    FinishOnce(grpc::Status(grpc::StatusCode::UNAVAILABLE, "coordinator shutting down; reconnect"));
    return;
  }
  Pump();
}

void WatchJobReactor::FinishOnce(const grpc::Status& status) {
  if (finished_) return;
  finished_ = true;
  Finish(status);
}

void WatchJobReactor::OnEvents(const std::vector<v1::JobEvent>& events) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (finished_) return;
    for (const auto& event : events) {
      if (event.sequence() <= have_upto_) continue;
      if (event.sequence() == have_upto_ + 1 && !need_reload_) {
        queue_.push_back(event);
        ++have_upto_;
      } else {
        need_reload_ = true;  // a gap (commits published out of order): the store has it
      }
    }
  }
  Pump();
}

void WatchJobReactor::Pump() {
  while (true) {
    int64_t reload_from = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finished_ || writing_) return;
      if (!queue_.empty()) {
        current_ = std::move(queue_.front());
        queue_.pop_front();
        writing_ = true;
        StartWrite(&current_);
        return;
      }
      if (terminal_sent_) {
        FinishOnce(grpc::Status::OK);
        return;
      }
      if (!need_reload_) return;  // idle until the hub calls OnEvents
      need_reload_ = false;
      reload_from = have_upto_ + 1;
    }
    // Read outside mu_: the store's lock is never taken while holding a stream's lock.
    absl::StatusOr<std::vector<v1::JobEvent>> events =
        scheduler_->ReadEvents(job_id_, reload_from, kReloadBatch);
    std::lock_guard<std::mutex> lock(mu_);
    if (!events.ok()) {
      FinishOnce(ToGrpcStatus(events.status()));
      return;
    }
    for (auto& event : *events) {
      if (event.sequence() != have_upto_ + 1) continue;
      queue_.push_back(std::move(event));
      ++have_upto_;
    }
    if (static_cast<int>(events->size()) == kReloadBatch)
      need_reload_ = true;  // more after this batch
  }
}

void WatchJobReactor::OnWriteDone(bool ok) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    writing_ = false;
    if (!ok) {
      FinishOnce(grpc::Status(grpc::StatusCode::CANCELLED, "client went away"));
      return;
    }
    if (IsTerminalEvent(current_)) terminal_sent_ = true;
  }
  Pump();
}

void WatchJobReactor::OnShutdown() {
  std::lock_guard<std::mutex> lock(mu_);
  FinishOnce(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                          "coordinator shutting down; reconnect with from_sequence"));
}

void WatchJobReactor::OnCancel() {
  std::lock_guard<std::mutex> lock(mu_);
  FinishOnce(grpc::Status::CANCELLED);
}

void WatchJobReactor::OnDone() {
  if (subscribed_) hub_->Unsubscribe(job_id_, this);
  delete this;
}

}  // namespace crossdiff::server
