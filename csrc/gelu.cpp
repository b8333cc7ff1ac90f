#include "gelu.h"

#include <cmath>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define VIVACE_X86 1
#endif

#include "exp_nonpositive.h"

namespace vivace {
namespace {

// Abramowitz and Stegun 7.1.26: erf(a) = 1 - (p1 t + p2 t^2 + ... + p5 t^5) exp(-a^2), t = 1 / (1 + p a), a >= 0.
constexpr float kP = 0.3275911f, kP1 = 0.254829592f, kP2 = -0.284496736f, kP3 = 1.421413741f, kP4 = -1.453152027f,
                kP5 = 1.061405429f;
constexpr float kSqrtHalf = 0.70710678118654752440f;

float gelu_scalar(float x) {
  const float a = std::fabs(x * kSqrtHalf);
  const float t = 1.0f / std::fma(kP, a, 1.0f);
  const float r = std::fma(std::fma(std::fma(std::fma(kP5, t, kP4), t, kP3), t, kP2), t, kP1);
  const float erf_abs = std::fma(t * -std::exp(-a * a), r, 1.0f);
  return x * 0.5f * (1.0f + std::copysign(erf_abs, x));
}

#ifdef VIVACE_X86
#pragma GCC push_options
#pragma GCC target("avx512f")
void gelu_avx512(float* x, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(mask, x + i);
    const __m512 a = _mm512_abs_ps(_mm512_mul_ps(v, _mm512_set1_ps(kSqrtHalf)));
    const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(kP), a, one));
    __m512 r = _mm512_fmadd_ps(_mm512_set1_ps(kP5), t, _mm512_set1_ps(kP4));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(kP3));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(kP2));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(kP1));
    const __m512 zero = _mm512_setzero_ps();
    const __m512 minus_exp = _mm512_sub_ps(zero, exp_nonpositive(_mm512_sub_ps(zero, _mm512_mul_ps(a, a))));
    const __m512 erf_abs = _mm512_fmadd_ps(_mm512_mul_ps(t, minus_exp), r, one);  // torch's order of operations
    const __m512i sign = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(INT32_MIN));
    const __m512 erf = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(erf_abs), sign));
    _mm512_mask_storeu_ps(x + i, mask, _mm512_mul_ps(_mm512_mul_ps(v, half), _mm512_add_ps(one, erf)));
  }
}
#pragma GCC pop_options
#endif

}  // namespace

void gelu_inplace(float* x, int64_t n) {
#ifdef VIVACE_X86
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512) return gelu_avx512(x, n);
#endif
  for (int64_t i = 0; i < n; ++i) x[i] = gelu_scalar(x[i]);
}

}  // namespace vivace
