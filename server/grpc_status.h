// The one place where internal errors become gRPC errors. absl and gRPC share the canonical codes,
// so the code and message reach the client unchanged.
#pragma once

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace crossdiff::server {

grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace crossdiff::server
