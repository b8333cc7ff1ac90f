#pragma once
// Horizontal sums of sixteen AVX-512 vectors at once. Include after <immintrin.h>; callers compile for AVX-512F.
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

namespace vivace {

// Element i of the result = the sum of v[i]'s sixteen 32-bit lanes, added by `add` (integer or float, on the bits)
// in a fixed tree: 45 shuffles and adds for sixteen sums, against ~10 per vector reduced on its own.
template <class Add>
__attribute__((target("avx512f"), always_inline)) inline __m512i transpose_sums(const __m512i (&v)[16], Add add) {
  __m512i pairs[8], quads[4], halves[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    pairs[i] = add(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: that lane's sums of four vectors
    quads[i] = add(_mm512_unpacklo_epi64(pairs[2 * i], pairs[2 * i + 1]),
                   _mm512_unpackhi_epi64(pairs[2 * i], pairs[2 * i + 1]));
  for (int i = 0; i < 2; ++i)  // 128-bit lanes added in pairs
    halves[i] = add(_mm512_shuffle_i32x4(quads[2 * i], quads[2 * i + 1], 0x88),
                    _mm512_shuffle_i32x4(quads[2 * i], quads[2 * i + 1], 0xDD));
  return add(_mm512_shuffle_i32x4(halves[0], halves[1], 0x88), _mm512_shuffle_i32x4(halves[0], halves[1], 0xDD));
}

struct AddInt32 {
  __attribute__((target("avx512f"), always_inline)) __m512i operator()(__m512i a, __m512i b) const {
    return _mm512_add_epi32(a, b);
  }
};

struct AddFloat {
  __attribute__((target("avx512f"), always_inline)) __m512i operator()(__m512i a, __m512i b) const {
    return _mm512_castps_si512(_mm512_add_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b)));
  }
};

}  // namespace vivace
#endif
