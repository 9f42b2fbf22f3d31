// 16-float vectors for the hand-written kernels of src/ops (private to the library), in GCC and
// Clang vector extensions: one AVX-512 register, two AVX2 or four SSE ones. Kernels using them
// are compiled per ISA (DYNATTN_KERNEL_CLONES) with every helper inlined into each clone.
#pragma once
#if defined(__GNUC__) || defined(__clang__)
#define DYNATTN_HAVE_VEC16 1
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vector_clones.h"

namespace dynattn::detail::vec16 {

constexpr int64_t kLanes = 16;

// The 64-byte vectors never cross a call boundary: every helper is inlined into its clone.
#pragma GCC diagnostic ignored "-Wpsabi"

typedef float Vec __attribute__((vector_size(64)));
typedef int32_t IVec __attribute__((vector_size(64)));

// 16 lanes are one AVX-512 register; the AVX2 and baseline clones split them in two and four.
#if defined(__x86_64__) && defined(__linux__)
#define DYNATTN_KERNEL_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DYNATTN_KERNEL_CLONES
#endif

#if defined(__clang__)
#define DYNATTN_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define DYNATTN_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, IVec{__VA_ARGS__})
#endif

// n vectors of scratch, 64-byte aligned (std::vector<Vec> does not keep the vector type's
// alignment: its template argument drops the attribute).
class VecBuffer {
 public:
  explicit VecBuffer(int64_t n) : storage_(static_cast<size_t>(n + 1) * kLanes) {}
  Vec* data() {
    const auto address = reinterpret_cast<uintptr_t>(storage_.data());
    return reinterpret_cast<Vec*>((address + sizeof(Vec) - 1) / sizeof(Vec) * sizeof(Vec));
  }

 private:
  std::vector<float> storage_;
};

DYNATTN_ALWAYS_INLINE Vec splat(float s) {
  return Vec{} + s;
}

// The first `lanes` floats at p, zeros after them. A partial vector is an unrolled loop of
// conditional moves (masked moves on AVX-512), not a variable-length memcpy: that one is a
// library call, which cost the kernels more than their arithmetic on short rows (7x7 maps).
DYNATTN_ALWAYS_INLINE Vec load(const float* p, int64_t lanes) {
  Vec v{};
  if (lanes == kLanes) {
    std::memcpy(&v, p, sizeof v);  // one unaligned vector load
  } else {
#pragma GCC unroll 16
    for (int64_t l = 0; l < kLanes; ++l)
      if (l < lanes) v[l] = p[l];
  }
  return v;
}

DYNATTN_ALWAYS_INLINE void store(float* p, Vec v, int64_t lanes) {
  if (lanes == kLanes) {
    std::memcpy(p, &v, sizeof v);
  } else {
#pragma GCC unroll 16
    for (int64_t l = 0; l < kLanes; ++l)
      if (l < lanes) p[l] = v[l];
  }
}

// The sum of v's lanes in float, as four half-folds.
DYNATTN_ALWAYS_INLINE float lanes_sum(Vec v) {
  v += DYNATTN_SHUFFLE(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += DYNATTN_SHUFFLE(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += DYNATTN_SHUFFLE(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v += DYNATTN_SHUFFLE(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
}

DYNATTN_ALWAYS_INLINE Vec vmax(Vec a, Vec b) {
  return a > b ? a : b;  // keeps a NaN in b, which then reaches every output of the row
}

}  // namespace dynattn::detail::vec16
#endif
