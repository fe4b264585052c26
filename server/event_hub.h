// Fans committed job events out to the live WatchJob streams of each job.
//
// Delivery is best effort and may reorder across concurrent commits: subscribers detect gaps by
// sequence number and re-read the job store, which is the source of truth. Thread-safe. Subscribers
// must unsubscribe before they are destroyed; OnEvents/OnShutdown are called under the hub's lock,
// so they must not block and must not call back into the hub.
#pragma once

#include <map>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "crossdiff/v1/job.pb.h"

namespace crossdiff::server {

class EventSubscriber {
 public:
  virtual ~EventSubscriber() = default;
  // Events of the subscribed job, in commit order of one transaction.
  virtual void OnEvents(const std::vector<v1::JobEvent>& events) = 0;
  // The coordinator is stopping: end the stream.
  virtual void OnShutdown() = 0;
};

class EventHub {
 public:
  // Returns false after Shutdown() (the subscriber must end its stream itself).
  bool Subscribe(const std::string& job_id, EventSubscriber* subscriber);
  void Unsubscribe(const std::string& job_id, EventSubscriber* subscriber);
  void Publish(const std::vector<v1::JobEvent>& events);
  // Calls OnShutdown on every subscriber and refuses new ones.
  void Shutdown();
  size_t subscriber_count();

 private:
  std::mutex mu_;
  std::map<std::string, std::set<EventSubscriber*>> subscribers_;
  bool shutdown_ = false;
};

}  // namespace crossdiff::server
