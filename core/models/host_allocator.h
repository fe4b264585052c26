// Host-allocator tuning for CPU inference.
//
// A CPU forward allocates tens of activation buffers of a few MB each per block. glibc serves
// blocks above its (dynamic) mmap threshold with fresh mmap()s, so every such buffer is
// page-faulted in and zeroed by the kernel again on each use; on a Llama-shaped 512-wide model that
// costs about a quarter of the forward. Raising M_MMAP_THRESHOLD to glibc's maximum (32 MiB on
// 64-bit) keeps those buffers in the heap, where freed blocks are reused. Setting the threshold
// also freezes glibc's trim threshold at its 128 KiB default, so the free memory at the top of the
// heap went back to the kernel (brk) after every forward and was faulted in again by the next:
// M_TRIM_THRESHOLD of 256 MiB keeps it (a 512-wide pair harvests 25% faster on one thread, and two
// processes no longer contend on the kernel's page lists). Peak resident memory is unchanged; an
// idle process keeps at most 256 MiB of freed heap.
#pragma once

namespace crossdiff::models {

// Process-wide and idempotent (runs once); a no-op off glibc, when the environment variable
// CROSSDIFF_MALLOC_TUNING=0 is set, or when the user set MALLOC_MMAP_THRESHOLD_ themselves.
// CausalLM::Load calls it for CPU models. Thread-safe.
void TuneHostAllocatorForInference();

}  // namespace crossdiff::models
