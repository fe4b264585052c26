#include "server/access_control.h"

#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace crossdiff::server {
namespace {

// Compares without an early exit, so response time does not reveal how much of a secret matched.
bool ConstantTimeEquals(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

std::optional<std::string> BearerToken(const std::optional<std::string>& authorization) {
  if (!authorization.has_value()) return std::nullopt;
  std::string value(absl::StripAsciiWhitespace(*authorization));
  if (!absl::StartsWithIgnoreCase(value, "bearer ")) return std::nullopt;
  return std::string(absl::StripAsciiWhitespace(value.substr(7)));
}

}  // namespace

absl::StatusOr<AccessControl> AccessControl::Load(const std::string& tokens_file,
                                                  const std::string& worker_secret_file) {
  AccessControl access;
  if (!tokens_file.empty()) {
    std::ifstream in(tokens_file);
    if (!in) return absl::NotFoundError(absl::StrCat(tokens_file, ": cannot read the tokens file"));
    std::string line;
    int line_number = 0;
    while (std::getline(in, line)) {
      ++line_number;
      absl::string_view text = absl::StripAsciiWhitespace(line);
      if (text.empty() || text[0] == '#') continue;
      std::vector<std::string> fields =
          absl::StrSplit(text, absl::ByAnyChar(" \t"), absl::SkipEmpty());
      if (fields.size() != 2) {
        return absl::InvalidArgumentError(
            absl::StrCat(tokens_file, ":", line_number, ": expected `<team> <token>`"));
      }
      if (!access.team_by_token_.emplace(fields[1], fields[0]).second) {
        return absl::InvalidArgumentError(
            absl::StrCat(tokens_file, ":", line_number, ": token listed twice"));
      }
    }
    if (access.team_by_token_.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(tokens_file, ": no `<team> <token>` lines"));
    }
  }
  if (!worker_secret_file.empty()) {
    std::ifstream in(worker_secret_file);
    if (!in)
      return absl::NotFoundError(
          absl::StrCat(worker_secret_file, ": cannot read the worker secret file"));
    std::stringstream buffer;
    buffer << in.rdbuf();
    access.worker_secret_ = std::string(absl::StripAsciiWhitespace(buffer.str()));
    if (access.worker_secret_.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(worker_secret_file, ": the worker secret is empty"));
    }
  }
  return access;
}

bool AccessControl::IsLoopbackPeer(const std::string& peer) {
  return absl::StartsWith(peer, "ipv4:127.") || absl::StartsWith(peer, "ipv6:[::1]") ||
         absl::StartsWith(peer, "ipv6:%5B::1%5D") || absl::StartsWith(peer, "ipv6:[::ffff:127.") ||
         absl::StartsWith(peer, "unix:");
}

absl::StatusOr<std::string> AccessControl::AuthenticateClient(
    const std::optional<std::string>& authorization, const std::string& peer) const {
  if (team_by_token_.empty()) {
    if (IsLoopbackPeer(peer)) return std::string("local");
    return absl::UnauthenticatedError(
        "this coordinator has no tokens file and serves loopback clients only");
  }
  std::optional<std::string> token = BearerToken(authorization);
  if (!token.has_value()) {
    return absl::UnauthenticatedError(
        "missing `authorization: Bearer <token>` metadata (--token or CROSSDIFF_TOKEN)");
  }
  for (const auto& [known, team] : team_by_token_) {
    if (ConstantTimeEquals(known, *token)) return team;
  }
  return absl::UnauthenticatedError("unknown token");
}

absl::Status AccessControl::AuthenticateWorker(const std::optional<std::string>& authorization,
                                               const std::string& peer) const {
  if (worker_secret_.empty()) {
    if (IsLoopbackPeer(peer)) return absl::OkStatus();
    return absl::UnauthenticatedError(
        "this coordinator has no worker secret and serves loopback workers only");
  }
  std::optional<std::string> token = BearerToken(authorization);
  if (!token.has_value() || !ConstantTimeEquals(*token, worker_secret_)) {
    return absl::UnauthenticatedError("wrong or missing worker secret");
  }
  return absl::OkStatus();
}

}  // namespace crossdiff::server
