#include "server/event_hub.h"

namespace crossdiff::server {

bool EventHub::Subscribe(const std::string& job_id, EventSubscriber* subscriber) {
  std::lock_guard<std::mutex> lock(mu_);
  if (shutdown_) return false;
  subscribers_[job_id].insert(subscriber);
  return true;
}

void EventHub::Unsubscribe(const std::string& job_id, EventSubscriber* subscriber) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = subscribers_.find(job_id);
  if (it == subscribers_.end()) return;
  it->second.erase(subscriber);
  if (it->second.empty()) subscribers_.erase(it);
}

void EventHub::Publish(const std::vector<v1::JobEvent>& events) {
  // Group by job (a transaction may touch several jobs), keeping order.
  std::map<std::string, std::vector<v1::JobEvent>> by_job;
  for (const auto& event : events) by_job[event.job_id()].push_back(event);
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [job_id, job_events] : by_job) {
    auto it = subscribers_.find(job_id);
    if (it == subscribers_.end()) continue;
    for (EventSubscriber* subscriber : it->second) subscriber->OnEvents(job_events);
  }
}

void EventHub::Shutdown() {
  std::lock_guard<std::mutex> lock(mu_);
  shutdown_ = true;
  for (const auto& [job_id, subscribers] : subscribers_) {
    for (EventSubscriber* subscriber : subscribers) subscriber->OnShutdown();
  }
}

size_t EventHub::subscriber_count() {
  std::lock_guard<std::mutex> lock(mu_);
  size_t count = 0;
  for (const auto& [job_id, subscribers] : subscribers_) count += subscribers.size();
  return count;
}

}  // namespace crossdiff::server
