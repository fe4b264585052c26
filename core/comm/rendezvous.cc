#include "core/comm/rendezvous.h"

#include <algorithm>
#include <csignal>
#include <optional>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace crossdiff::comm {
namespace {

constexpr char kWorldSizeKey[] = "crossdiff/world_size";

std::string JoinKey(int rank) { return absl::StrCat("crossdiff/join/", rank); }
std::string HeartbeatKey(int rank) { return absl::StrCat("crossdiff/hb/", rank); }
std::string ClosedKey(int rank) { return absl::StrCat("crossdiff/closed/", rank); }

std::vector<uint8_t> ToBytes(const std::string& s) { return {s.begin(), s.end()}; }
std::string FromBytes(const std::vector<uint8_t>& b) { return {b.begin(), b.end()}; }

// c10::Error messages carry a backtrace after the first line in some builds; keep the first line.
std::string FirstLine(const char* what) {
  std::string msg = what;
  if (auto nl = msg.find('\n'); nl != std::string::npos) msg.resize(nl);
  return msg;
}
std::string ErrorText(const std::exception& e) {
  if (auto* c10_error = dynamic_cast<const c10::Error*>(&e)) {
    return FirstLine(c10_error->what_without_backtrace());
  }
  return FirstLine(e.what());
}

std::string Seconds(std::chrono::milliseconds ms) {
  return absl::StrCat(static_cast<double>(ms.count()) / 1000.0, "s");
}

// One peer's heartbeat as read from the store.
struct PeerState {
  bool closed = false;
  int64_t closed_after = 0;  // last collective seq when it closed
  bool seen = false;         // a heartbeat exists
  int64_t seq = 0;
  int64_t tick = 0;
};

}  // namespace

absl::Status ValidateRendezvousOptions(const RendezvousOptions& o) {
  if (o.backend != "gloo" && o.backend != "nccl" && o.backend != "local") {
    return absl::InvalidArgumentError(
        absl::StrCat("backend: '", o.backend, "' is not one of gloo, nccl, local"));
  }
  if (o.world_size < 1) {
    return absl::InvalidArgumentError(absl::StrCat("world_size: ", o.world_size, " is < 1"));
  }
  if (o.rank < 0 || o.rank >= o.world_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank: ", o.rank, " is outside [0, ", o.world_size, ")"));
  }
  if (o.backend == "local" && o.world_size != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("backend: 'local' needs world_size 1, got ", o.world_size));
  }
  if (o.port < 0 || o.port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("port: ", o.port, " is outside [0, 65535]"));
  }
  if (o.port == 0 && o.rank != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("port: rank ", o.rank, " needs the port rank 0 bound, got 0"));
  }
  if (o.host.empty()) return absl::InvalidArgumentError("host: empty rendezvous host");
  if (o.timeout.count() <= 0) return absl::InvalidArgumentError("timeout: must be positive");
  if (o.join_timeout.count() < 0) {
    return absl::InvalidArgumentError("join_timeout: must not be negative");
  }
  return absl::OkStatus();
}

struct Rendezvous::Stores {
  c10::intrusive_ptr<c10d::Store> main;      // rank 0: also hosts the server
  c10::intrusive_ptr<c10d::TCPStore> beats;  // a second client, used only by the heartbeat thread
};

Rendezvous::Rendezvous(const RendezvousOptions& options)
    : options_(options),
      // Fine enough that a dead peer is noticed well within the timeout, coarse enough that a
      // loaded machine does not make a live peer look dead.
      heartbeat_interval_(std::clamp<std::chrono::milliseconds>(
          options.timeout / 20, std::chrono::milliseconds(20), std::chrono::milliseconds(500))),
      stores_(std::make_unique<Stores>()) {}

Rendezvous::~Rendezvous() {
  // Closed before the heartbeat stops, so that peers never mistake a clean exit for a death.
  bool store_up = false;
  if (stores_ && stores_->main) {
    try {
      stores_->main->set(ClosedKey(options_.rank), ToBytes(std::to_string(seq_.load())));
      store_up = true;
    } catch (...) {
      // The store host is gone already; peers then diagnose from the heartbeats.
    }
  }
  // Rank 0 hosts the store: it lingers (bounded) until every peer has closed too, so that a peer
  // still explaining a failure can read the heartbeats instead of finding the store gone.
  if (store_up && options_.rank == 0 && options_.world_size > 1 && heartbeat_.joinable()) {
    const auto deadline =
        std::chrono::steady_clock::now() + DiagnosisWindow() * 2 + std::chrono::milliseconds(1000);
    try {
      while (std::chrono::steady_clock::now() < deadline) {
        bool all_closed = true;
        for (int q = 1; q < options_.world_size && all_closed; ++q) {
          all_closed = stores_->main->check({ClosedKey(q)});
        }
        if (all_closed) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    } catch (...) {
    }
  }
  if (heartbeat_.joinable()) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    heartbeat_.join();
  }
}

std::chrono::milliseconds Rendezvous::DiagnosisWindow() const {
  return std::max<std::chrono::milliseconds>(heartbeat_interval_ * 5,
                                             std::chrono::milliseconds(1000));
}

c10d::Store& Rendezvous::store() { return *stores_->main; }
const c10::intrusive_ptr<c10d::Store>& Rendezvous::store_ptr() const { return stores_->main; }

absl::StatusOr<std::unique_ptr<Rendezvous>> Rendezvous::Join(const RendezvousOptions& options) {
  if (absl::Status s = ValidateRendezvousOptions(options); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("rank ", options.rank, ": ", s.message()));
  }
  // A peer that vanished must surface as an error from a socket write (store or backend), not
  // kill this process: SIGPIPE is ignored process-wide from here on.
  std::signal(SIGPIPE, SIG_IGN);
  std::unique_ptr<Rendezvous> r(new Rendezvous(options));
  if (absl::Status s = r->Connect(); !s.ok()) return s;
  if (absl::Status s = r->WaitForAllRanks(); !s.ok()) return s;
  r->heartbeat_ = std::thread([raw = r.get()] { raw->HeartbeatLoop(); });
  return r;
}

absl::Status Rendezvous::Connect() {
  const RendezvousOptions& o = options_;
  const std::string where = absl::StrCat(o.host, ":", o.port);
  c10d::TCPStoreOptions so;
  so.port = static_cast<uint16_t>(o.port);
  so.isServer = o.rank == 0;
  so.waitWorkers = false;  // our own join protocol names the missing ranks
  so.timeout = join_timeout();
  try {
    auto store = c10::make_intrusive<c10d::TCPStore>(o.host, so);
    bound_port_ = store->getPort();
    stores_->main = store;
  } catch (const std::exception& e) {
    // c10d throws c10::Error or its own socket/timeout errors (not always c10::Error subclasses).
    if (o.rank == 0) {
      return absl::UnavailableError(
          absl::StrCat("rank 0: cannot host the rendezvous store on ", where, ": ", ErrorText(e)));
    }
    return absl::DeadlineExceededError(absl::StrCat(
        "rank ", o.rank, ": rendezvous store at ", where,
        " (hosted by rank 0) not reachable within ", Seconds(join_timeout()), ": ", ErrorText(e)));
  }
  if (o.rank == 0 && o.on_store_bound) o.on_store_bound(bound_port_);
  try {
    c10d::TCPStoreOptions bo;
    bo.port = static_cast<uint16_t>(bound_port_);
    bo.isServer = false;
    bo.waitWorkers = false;
    bo.timeout = o.timeout;
    stores_->beats = c10::make_intrusive<c10d::TCPStore>(o.host, bo);
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("rank ", o.rank, ": second connection to store ",
                                               o.host, ":", bound_port_, ": ", ErrorText(e)));
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> Rendezvous::AddToCounter(const std::string& name, int64_t delta) {
  try {
    return stores_->main->add(absl::StrCat("crossdiff/counter/", name), delta);
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat(
        "rank ", options_.rank, ": counter \"", name, "\": the rendezvous store (rank 0) at ",
        options_.host, ":", bound_port_, " is unreachable: ", ErrorText(e)));
  }
}

absl::Status Rendezvous::WaitForAllRanks() {
  const RendezvousOptions& o = options_;
  const std::string me = absl::StrCat("rank ", o.rank, ": ");
  const std::string where = absl::StrCat(o.host, ":", bound_port_);
  c10d::Store& store = *stores_->main;
  try {
    if (o.rank == 0) store.set(kWorldSizeKey, ToBytes(std::to_string(o.world_size)));
    // get() waits (bounded by the store timeout) until rank 0 has published it.
    std::string theirs = FromBytes(store.get(kWorldSizeKey));
    if (theirs != std::to_string(o.world_size)) {
      return absl::FailedPreconditionError(absl::StrCat(
          me, "world size ", o.world_size, " but rank 0 at ", where, " uses ", theirs));
    }
    if (store.add(JoinKey(o.rank), 1) != 1) {
      return absl::AlreadyExistsError(
          absl::StrCat(me, "another process already joined ", where, " as rank ", o.rank));
    }
    // The first heartbeat exists before anyone can run a collective.
    stores_->main->set(HeartbeatKey(o.rank), ToBytes("0 0"));
  } catch (const std::exception& e) {
    return absl::DeadlineExceededError(
        absl::StrCat(me, "rendezvous at ", where, " failed: ", ErrorText(e)));
  }
  std::vector<std::string> keys;
  for (int q = 0; q < o.world_size; ++q) keys.push_back(JoinKey(q));
  try {
    store.wait(keys, join_timeout());
    store.setTimeout(o.timeout);  // from now on, waits follow the collective timeout
    return absl::OkStatus();
  } catch (const std::exception& e) {
    std::vector<int> missing;
    try {
      for (int q = 0; q < o.world_size; ++q) {
        if (!store.check({JoinKey(q)})) missing.push_back(q);
      }
    } catch (const std::exception&) {
      return absl::UnavailableError(absl::StrCat(
          me, "rendezvous store at ", where, " (rank 0) went away while waiting for the others"));
    }
    if (missing.empty()) {
      return absl::DeadlineExceededError(
          absl::StrCat(me, "rendezvous at ", where, " failed: ", ErrorText(e)));
    }
    return absl::DeadlineExceededError(absl::StrCat(
        me, "rendezvous at ", where, " timed out after ", Seconds(join_timeout()), ": rank",
        missing.size() > 1 ? "s " : " ", absl::StrJoin(missing, ", "), " never joined (",
        o.world_size - static_cast<int>(missing.size()), " of ", o.world_size, " joined)"));
  }
}

void Rendezvous::HeartbeatLoop() {
  int64_t tick = 0;
  const std::string key = HeartbeatKey(options_.rank);
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (cv_.wait_for(lock, heartbeat_interval_, [this] { return stopping_; })) return;
    }
    try {
      stores_->beats->set(key, ToBytes(absl::StrCat(seq_.load(), " ", ++tick)));
    } catch (...) {
      // The store host is gone; collectives will fail and explain it.
    }
  }
}

absl::Status Rendezvous::ExplainFailure(const std::string& what, int64_t seq,
                                        const std::string& raw, bool timed_out) {
  const RendezvousOptions& o = options_;
  const std::string head =
      absl::StrCat("rank ", o.rank, ": ", what, " (collective #", seq, ") failed: ");
  const std::string tail = absl::StrCat(" [", o.backend, ": ", raw, "]");
  c10d::Store& store = *stores_->main;

  auto snapshot = [&]() -> std::optional<std::vector<PeerState>> {
    std::vector<PeerState> peers(o.world_size);
    try {
      for (int q = 0; q < o.world_size; ++q) {
        if (q == o.rank) continue;
        PeerState& p = peers[q];
        if (store.check({ClosedKey(q)})) {
          p.closed = true;
          (void)absl::SimpleAtoi(FromBytes(store.get(ClosedKey(q))), &p.closed_after);
        }
        if (store.check({HeartbeatKey(q)})) {
          std::vector<std::string> parts =
              absl::StrSplit(FromBytes(store.get(HeartbeatKey(q))), ' ');
          p.seen = parts.size() == 2 && absl::SimpleAtoi(parts[0], &p.seq) &&
                   absl::SimpleAtoi(parts[1], &p.tick);
        }
      }
    } catch (const std::exception&) {
      return std::nullopt;
    }
    return peers;
  };

  // Reads against a dead store host must not take the whole timeout again.
  const std::chrono::milliseconds saved = store.getTimeout();
  store.setTimeout(std::max<std::chrono::milliseconds>(heartbeat_interval_ * 10,
                                                       std::chrono::milliseconds(1000)));
  auto first = snapshot();
  std::optional<std::vector<PeerState>> second;
  if (first) {
    std::this_thread::sleep_for(DiagnosisWindow());
    second = snapshot();
  }
  store.setTimeout(saved);
  if (!first || !second) {
    return absl::UnavailableError(absl::StrCat(
        head, "rank 0 (which hosts the rendezvous store) is unreachable: it died or is frozen",
        tail));
  }

  std::vector<std::string> dead, closed, lagging;
  for (int q = 0; q < o.world_size; ++q) {
    if (q == o.rank) continue;
    const PeerState& a = (*first)[q];
    const PeerState& b = (*second)[q];
    if (b.closed) {
      // A peer that closed after entering this collective failed with it: not the cause.
      if (b.closed_after < seq) {
        closed.push_back(absl::StrCat(
            "rank ", q, " already closed its communicator after collective #", b.closed_after));
      }
    } else if (!b.seen || a.tick == b.tick) {
      dead.push_back(
          absl::StrCat("rank ", q, " stopped responding (its process died or is frozen)"));
    } else if (b.seq < seq) {
      lagging.push_back(absl::StrCat("rank ", q, " is alive but never entered it (still at #",
                                     b.seq, ": it hangs or runs a different program)"));
    }
  }
  if (!dead.empty()) {
    return absl::UnavailableError(absl::StrCat(head, absl::StrJoin(dead, "; "), tail));
  }
  if (!closed.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(head, absl::StrJoin(closed, "; "), tail));
  }
  if (!lagging.empty()) {
    return absl::DeadlineExceededError(absl::StrCat(head, absl::StrJoin(lagging, "; "), tail));
  }
  if (timed_out) {
    return absl::DeadlineExceededError(
        absl::StrCat(head, "timed out after ", Seconds(o.timeout), tail));
  }
  return absl::InternalError(absl::StrCat(head, raw));
}

}  // namespace crossdiff::comm
