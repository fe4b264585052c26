// Who may call the coordinator (docs/operations.md "Access control").
//
// Clients: with a tokens file (lines `<team> <token>`, `#` comments), a call must carry
// `authorization: Bearer <token>`; the token names the caller's team. Without a tokens file, only
// loopback peers are served, all as team "local". Workers: with a secret file, every WorkerService
// call must carry `authorization: Bearer <secret>`; without one, only loopback workers are served.
//
// Immutable after Load; thread-safe.
#pragma once

#include <map>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace crossdiff::server {

class AccessControl {
 public:
  // Empty paths disable the corresponding file. INVALID_ARGUMENT "FILE:LINE: ..." for a malformed
  // tokens file (a token listed twice, a line without two fields), NOT_FOUND for an unreadable one.
  static absl::StatusOr<AccessControl> Load(const std::string& tokens_file,
                                            const std::string& worker_secret_file);

  // `authorization` is the metadata value (nullopt when absent); `peer` is grpc's peer string
  // ("ipv4:127.0.0.1:5555"). Returns the caller's team, or UNAUTHENTICATED.
  absl::StatusOr<std::string> AuthenticateClient(const std::optional<std::string>& authorization,
                                                 const std::string& peer) const;
  // OK or UNAUTHENTICATED.
  absl::Status AuthenticateWorker(const std::optional<std::string>& authorization,
                                  const std::string& peer) const;

  static bool IsLoopbackPeer(const std::string& peer);
  bool has_tokens() const { return !team_by_token_.empty(); }

 private:
  std::map<std::string, std::string> team_by_token_;
  std::string worker_secret_;
};

}  // namespace crossdiff::server
