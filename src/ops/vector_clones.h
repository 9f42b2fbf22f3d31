// Function multi-versioning for the hand-written loops of src/ops (private to the library).
// The loops over a feature map are compiled twice, for AVX2 and for the baseline ISA, and the
// loader picks one per machine (GCC/Clang target_clones). ATen's own kernels dispatch the same
// way; baseline SSE2 code alone is up to 2x slower than them on full-map passes.
#pragma once

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define DYNATTN_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define DYNATTN_VECTOR_CLONES
#endif
// The small helpers must be inlined into each clone to be compiled for its ISA.
#if defined(__GNUC__) || defined(__clang__)
#define DYNATTN_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define DYNATTN_ALWAYS_INLINE inline
#endif
