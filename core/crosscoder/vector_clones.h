// CROSSDIFF_VECTOR_CLONES: hot loops get an AVX2 clone next to the baseline one on x86-64 (picked
// at load time by CPU feature, not by CPU model, so AMD and Intel both get it), so the binary stays
// portable while using the machine's vector units. For sources compiled with
// crossdiff_vector_kernel_sources (cmake/CrossdiffTargets.cmake).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CROSSDIFF_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CROSSDIFF_VECTOR_CLONES
#endif
