#include "core/models/host_allocator.h"

#include <cstdlib>
#include <mutex>
#include <string>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace crossdiff::models {

void TuneHostAllocatorForInference() {
  static std::once_flag once;
  std::call_once(once, [] {
#if defined(__GLIBC__)
    const char* opt_out = std::getenv("CROSSDIFF_MALLOC_TUNING");
    if (opt_out != nullptr && std::string(opt_out) == "0") return;
    if (std::getenv("MALLOC_MMAP_THRESHOLD_") != nullptr) return;  // the user's choice wins
    // glibc's upper limit for the threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX).
    constexpr int kMaxMmapThreshold = 32 * 1024 * 1024;
    mallopt(M_MMAP_THRESHOLD, kMaxMmapThreshold);
    if (std::getenv("MALLOC_TRIM_THRESHOLD_") == nullptr) {
      mallopt(M_TRIM_THRESHOLD, 256 * 1024 * 1024);
    }
#endif
  });
}

}  // namespace crossdiff::models
