#pragma once
// exp(v) for v <= 0 in two forms that give the same bits: sixteen lanes of AVX-512 and one float (the portable form
// of the kernels that use it). Include after <immintrin.h> on x86.
#include <cmath>
#include <initializer_list>

namespace vivace {

constexpr float kExpLog2E = 1.44269504088896341f;
constexpr float kExpLn2High = 0.693359375f, kExpLn2Low = -2.12194440e-4f;  // ln 2 in two parts
constexpr float kExpLowest = -104.0f;  // where 2^n underflows to 0

// 2^n * e^r, n = round(v / ln 2) (ties to even), r = v - n ln 2 (two-part ln 2), e^r by its degree-7 Taylor
// polynomial (|r| <= ln 2 / 2: truncation under 2e-8, about a float32 ulp with the rounding); v is clamped at -104.
inline float exp_nonpositive_scalar(float v) {
  v = std::fmax(v, kExpLowest);
  const float n = std::nearbyint(v * kExpLog2E);
  float r = std::fma(-n, kExpLn2High, v);
  r = std::fma(-n, kExpLn2Low, r);
  float p = 1.0f / 5040;
  for (const float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = std::fma(p, r, c);
  return std::ldexp(p, static_cast<int>(n));
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f"))) inline __m512 exp_nonpositive(__m512 v) {
  v = _mm512_max_ps(v, _mm512_set1_ps(kExpLowest));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(kExpLog2E)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kExpLn2High), v);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kExpLn2Low), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#endif

}  // namespace vivace
