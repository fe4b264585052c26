#include "core/comm/connect.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "core/comm/rendezvous.h"
#if CROSSDIFF_HAVE_GLOO
#include "core/comm/gloo_communicator.h"
#endif
#if CROSSDIFF_HAVE_NCCL
#include "core/comm/nccl_communicator.h"
#endif

namespace crossdiff::comm {

bool HaveNcclBackend() { return CROSSDIFF_HAVE_NCCL != 0; }
bool HaveGlooBackend() { return CROSSDIFF_HAVE_GLOO != 0; }

absl::StatusOr<std::unique_ptr<Communicator>> Connect(const RendezvousOptions& options) {
  if (absl::Status s = ValidateRendezvousOptions(options); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("rank ", options.rank, ": ", s.message()));
  }
  if (options.backend == "local") return MakeLocalCommunicator();
  if (options.backend == "nccl" && !HaveNcclBackend()) {
    return absl::UnimplementedError(absl::StrCat(
        "rank ", options.rank, ": backend nccl: this build has no CUDA/NCCL (use gloo)"));
  }
  if (options.backend == "gloo" && !HaveGlooBackend()) {
    return absl::UnimplementedError(absl::StrCat(
        "rank ", options.rank, ": backend gloo: this build has no Gloo headers (libgloo-dev)"));
  }
  absl::StatusOr<std::unique_ptr<Rendezvous>> rendezvous = Rendezvous::Join(options);
  if (!rendezvous.ok()) return rendezvous.status();
#if CROSSDIFF_HAVE_NCCL
  if (options.backend == "nccl") return MakeNcclCommunicator(std::move(*rendezvous));
#endif
#if CROSSDIFF_HAVE_GLOO
  return MakeGlooCommunicator(std::move(*rendezvous));
#else
  return absl::UnimplementedError("unreachable: no Gloo backend");
#endif
}

}  // namespace crossdiff::comm
