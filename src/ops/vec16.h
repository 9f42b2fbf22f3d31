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

// out[i] = the lanes of v[i] combined by op (an associative Vec x Vec -> Vec, e.g. a sum), for
// 16 vectors at once: a tree of pairwise half-folds, 15 shuffle-and-combine steps instead of 16
// horizontal reductions.
template <typename Op>
DYNATTN_ALWAYS_INLINE Vec fold_lanes_of_16(const Vec* v, Op op) {
  Vec h8[8], h4[4], h2[2];
  for (int i = 0; i < 8; ++i) {
    const Vec a = v[2 * i], b = v[2 * i + 1];
    h8[i] = op(DYNATTN_SHUFFLE(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
               DYNATTN_SHUFFLE(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31));
  }
  for (int i = 0; i < 4; ++i) {
    const Vec a = h8[2 * i], b = h8[2 * i + 1];
    h4[i] = op(DYNATTN_SHUFFLE(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27),
               DYNATTN_SHUFFLE(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31));
  }
  for (int i = 0; i < 2; ++i) {
    const Vec a = h4[2 * i], b = h4[2 * i + 1];
    h2[i] = op(DYNATTN_SHUFFLE(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29),
               DYNATTN_SHUFFLE(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31));
  }
  return op(
      DYNATTN_SHUFFLE(h2[0], h2[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
      DYNATTN_SHUFFLE(h2[0], h2[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31));
}

// Combining ops for fold_lanes_of_16 (functors, so that they inline into each clone).
struct AddLanes {
  DYNATTN_ALWAYS_INLINE Vec operator()(Vec a, Vec b) const { return a + b; }
};
// max_of's rule lane by lane: a < b ? b : a.
struct MaxLanes {
  DYNATTN_ALWAYS_INLINE Vec operator()(Vec a, Vec b) const { return a < b ? b : a; }
};

// out[i] = the sum of the lanes of v[i], for 16 vectors.
DYNATTN_ALWAYS_INLINE Vec sum_lanes_of_16(const Vec* v) {
  return fold_lanes_of_16(v, AddLanes{});
}

DYNATTN_ALWAYS_INLINE Vec vmax(Vec a, Vec b) {
  return a > b ? a : b;  // keeps a NaN in b, which then reaches every output of the row
}

}  // namespace dynattn::detail::vec16
#endif
