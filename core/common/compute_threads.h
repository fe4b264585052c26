// The number of threads LibTorch's CPU kernels use, applied to every pool that runs them.
//
// at::set_num_threads sizes ATen's intra-op pool, but the BLAS behind LibTorch on Debian
// (OpenBLAS, libopenblas0-pthread) keeps its own pool, sized to every core at load time: a
// "1 thread" run would still multiply matrices on all cores, and two such processes on one
// machine would oversubscribe it (OpenBLAS's idle threads spin in sched_yield). SetComputeThreads
// sizes both; the OpenBLAS entry point is looked up at run time, so other BLAS builds are
// unaffected.
#pragma once

#include <ATen/Parallel.h>
#include <dlfcn.h>

namespace crossdiff {

// n <= 0 leaves every pool at its default.
inline void SetComputeThreads(int n) {
  if (n <= 0) return;
  at::set_num_threads(n);
  using SetThreads = void (*)(int);
  if (auto* fn = reinterpret_cast<SetThreads>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"))) {
    fn(n);
  }
}

}  // namespace crossdiff
