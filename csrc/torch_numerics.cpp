#include "torch_numerics.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace vivace {
namespace {

inline int64_t bits_of(double d) {
  int64_t b;
  std::memcpy(&b, &d, sizeof b);
  return b;
}

inline double from_bits(int64_t b) {
  double d;
  std::memcpy(&d, &b, sizeof d);
  return d;
}

constexpr double kLog2e = 1.442695040888963407359924681001892137426645954152985934135449406931;
constexpr double kLn2Hi = .69314718055966295651160180568695068359375;
constexpr double kLn2Lo = .28235290563031577122588448175013436025525412068e-12;
constexpr double kC9 = +0.2081276378237164457e-8, kC8 = +0.2511210703042288022e-7;
constexpr double kC7 = +0.2755762628169491192e-6, kC6 = +0.2755723402025388239e-5;
constexpr double kC5 = +0.2480158687479686264e-4, kC4 = +0.1984126989855865850e-3;
constexpr double kC3 = +0.1388888888914497797e-2, kC2 = +0.8333333333314938210e-2;
constexpr double kC1 = +0.4166666666666602598e-1, kC0 = +0.1666666666666669072e+0;
constexpr double kMagic = 6755399441055744.0;  // 2^52 + 2^51: k + kMagic holds an integral k in its low bits

// 2^k for an integral double k in the normal range, built from the exponent bits.
inline double pow2(double k) { return from_bits((bits_of(k + kMagic) - bits_of(kMagic) + 0x3ff) << 52); }

// SLEEF 3.x xexp (u10, FMA build), as torch's Vectorized<double>::exp calls it, for d <= 0 (not NaN):
// q = rint(d / ln2), s = d - q ln2 in two steps, an Estrin degree-10 polynomial, then two multiplies by
// 2^(q/2) and 2^(q - q/2). Inputs under -1000 (-inf included) give +0. The vector versions below are the
// same operations lane by lane.
inline double sleef_exp_nonpositive(double d) {
  const double q = __builtin_rint(d * kLog2e);
  double s = __builtin_fma(q, -kLn2Hi, d);
  s = __builtin_fma(q, -kLn2Lo, s);
  const double s2 = s * s, s4 = s2 * s2, s8 = s4 * s4;
  const double p98 = __builtin_fma(s, kC9, kC8);
  const double p74 = __builtin_fma(s2, __builtin_fma(s, kC7, kC6), __builtin_fma(s, kC5, kC4));
  const double p30 = __builtin_fma(s2, __builtin_fma(s, kC3, kC2), __builtin_fma(s, kC1, kC0));
  double u = __builtin_fma(s8, p98, __builtin_fma(s4, p74, p30));
  u = __builtin_fma(u, s, 0.5);
  u = __builtin_fma(u, s, 1.0);
  u = __builtin_fma(u, s, 1.0);
  const double half = std::floor(q * 0.5);
  u = u * pow2(half) * pow2(q - half);
  return d >= -1000.0 ? u : 0.0;
}

void scalar_shifted_exp(const double* x, double shift, double* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = sleef_exp_nonpositive(x[i] - shift);
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f"))) inline __m512d pow2_avx512(__m512d k) {
  const __m512i bits = _mm512_sub_epi64(_mm512_castpd_si512(_mm512_add_pd(k, _mm512_set1_pd(kMagic))),
                                        _mm512_castpd_si512(_mm512_set1_pd(kMagic)));
  return _mm512_castsi512_pd(_mm512_slli_epi64(_mm512_add_epi64(bits, _mm512_set1_epi64(0x3ff)), 52));
}

__attribute__((target("avx512f"))) inline __m512d sleef_exp_avx512(__m512d d) {
  const __m512d q = _mm512_roundscale_pd(_mm512_mul_pd(d, _mm512_set1_pd(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512d s = _mm512_fmadd_pd(q, _mm512_set1_pd(-kLn2Hi), d);
  s = _mm512_fmadd_pd(q, _mm512_set1_pd(-kLn2Lo), s);
  const __m512d s2 = _mm512_mul_pd(s, s), s4 = _mm512_mul_pd(s2, s2), s8 = _mm512_mul_pd(s4, s4);
  const __m512d p98 = _mm512_fmadd_pd(s, _mm512_set1_pd(kC9), _mm512_set1_pd(kC8));
  const __m512d p74 = _mm512_fmadd_pd(s2, _mm512_fmadd_pd(s, _mm512_set1_pd(kC7), _mm512_set1_pd(kC6)), _mm512_fmadd_pd(s, _mm512_set1_pd(kC5), _mm512_set1_pd(kC4)));
  const __m512d p30 = _mm512_fmadd_pd(s2, _mm512_fmadd_pd(s, _mm512_set1_pd(kC3), _mm512_set1_pd(kC2)), _mm512_fmadd_pd(s, _mm512_set1_pd(kC1), _mm512_set1_pd(kC0)));
  __m512d u = _mm512_fmadd_pd(s8, p98, _mm512_fmadd_pd(s4, p74, p30));
  u = _mm512_fmadd_pd(u, s, _mm512_set1_pd(0.5));
  u = _mm512_fmadd_pd(u, s, _mm512_set1_pd(1.0));
  u = _mm512_fmadd_pd(u, s, _mm512_set1_pd(1.0));
  const __m512d half = _mm512_roundscale_pd(_mm512_mul_pd(q, _mm512_set1_pd(0.5)), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  u = _mm512_mul_pd(_mm512_mul_pd(u, pow2_avx512(half)), pow2_avx512(_mm512_sub_pd(q, half)));
  return _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(d, _mm512_set1_pd(-1000.0), _CMP_GE_OQ), u);
}

__attribute__((target("avx512f"))) void avx512_shifted_exp(const double* x, double shift, double* out, int64_t n) {
  const __m512d m = _mm512_set1_pd(shift);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm512_storeu_pd(out + i, sleef_exp_avx512(_mm512_sub_pd(_mm512_loadu_pd(x + i), m)));
  if (i < n) {
    const __mmask8 tail = static_cast<__mmask8>((1u << (n - i)) - 1);
    _mm512_mask_storeu_pd(out + i, tail, sleef_exp_avx512(_mm512_sub_pd(_mm512_maskz_loadu_pd(tail, x + i), m)));
  }
}

__attribute__((target("avx2,fma"))) inline __m256d pow2_avx2(__m256d k) {
  const __m256i bits = _mm256_sub_epi64(_mm256_castpd_si256(_mm256_add_pd(k, _mm256_set1_pd(kMagic))),
                                        _mm256_castpd_si256(_mm256_set1_pd(kMagic)));
  return _mm256_castsi256_pd(_mm256_slli_epi64(_mm256_add_epi64(bits, _mm256_set1_epi64x(0x3ff)), 52));
}

__attribute__((target("avx2,fma"))) inline __m256d sleef_exp_avx2(__m256d d) {
  const __m256d q = _mm256_round_pd(_mm256_mul_pd(d, _mm256_set1_pd(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256d s = _mm256_fmadd_pd(q, _mm256_set1_pd(-kLn2Hi), d);
  s = _mm256_fmadd_pd(q, _mm256_set1_pd(-kLn2Lo), s);
  const __m256d s2 = _mm256_mul_pd(s, s), s4 = _mm256_mul_pd(s2, s2), s8 = _mm256_mul_pd(s4, s4);
  const __m256d p98 = _mm256_fmadd_pd(s, _mm256_set1_pd(kC9), _mm256_set1_pd(kC8));
  const __m256d p74 = _mm256_fmadd_pd(s2, _mm256_fmadd_pd(s, _mm256_set1_pd(kC7), _mm256_set1_pd(kC6)), _mm256_fmadd_pd(s, _mm256_set1_pd(kC5), _mm256_set1_pd(kC4)));
  const __m256d p30 = _mm256_fmadd_pd(s2, _mm256_fmadd_pd(s, _mm256_set1_pd(kC3), _mm256_set1_pd(kC2)), _mm256_fmadd_pd(s, _mm256_set1_pd(kC1), _mm256_set1_pd(kC0)));
  __m256d u = _mm256_fmadd_pd(s8, p98, _mm256_fmadd_pd(s4, p74, p30));
  u = _mm256_fmadd_pd(u, s, _mm256_set1_pd(0.5));
  u = _mm256_fmadd_pd(u, s, _mm256_set1_pd(1.0));
  u = _mm256_fmadd_pd(u, s, _mm256_set1_pd(1.0));
  const __m256d half = _mm256_floor_pd(_mm256_mul_pd(q, _mm256_set1_pd(0.5)));
  u = _mm256_mul_pd(_mm256_mul_pd(u, pow2_avx2(half)), pow2_avx2(_mm256_sub_pd(q, half)));
  return _mm256_and_pd(_mm256_cmp_pd(d, _mm256_set1_pd(-1000.0), _CMP_GE_OQ), u);
}

__attribute__((target("avx2,fma"))) void avx2_shifted_exp(const double* x, double shift, double* out, int64_t n) {
  const __m256d m = _mm256_set1_pd(shift);
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) _mm256_storeu_pd(out + i, sleef_exp_avx2(_mm256_sub_pd(_mm256_loadu_pd(x + i), m)));
  for (; i < n; ++i) out[i] = sleef_exp_nonpositive(x[i] - shift);
}
#endif

void sleef_shifted_exp(const double* x, double shift, double* out, int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const auto kernel = __builtin_cpu_supports("avx512f")                                  ? avx512_shifted_exp
                             : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? avx2_shifted_exp
                                                                                                 : scalar_shifted_exp;
  kernel(x, shift, out, n);
#else
  scalar_shifted_exp(x, shift, out, n);
#endif
}

void libm_shifted_exp(const double* x, double shift, double* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = std::exp(x[i] - shift);
}

template <int W>
double lane_sum_fixed(const double* x, int64_t begin, int64_t end) {
  double acc[W] = {};
  int64_t j = begin;
  for (; j < end && j % W; ++j) acc[j % W] += x[j];
  for (; j + W <= end; j += W)
    for (int l = 0; l < W; ++l) acc[l] += x[j + l];
  for (; j < end; ++j) acc[j % W] += x[j];
  double total = acc[0];
  for (int l = 1; l < W; ++l) total += acc[l];
  return total;
}

int64_t ceil_log2(int64_t x) {
  if (x <= 2) return 1;
  return 64 - __builtin_clzll(static_cast<uint64_t>(x - 1));
}

// SumKernel's row_sum over `vectors` W-wide vectors: multi_row_sum on groups of 4 vectors with
// 4-level cascaded accumulators, leftovers into partial 0, then partials 1..3 into partial 0.
template <int W>
void cascade_row_sum(const double* x, int64_t vectors, double out[W]) {
  constexpr int levels = 4, rows = 4;
  const int64_t size = vectors / rows;
  const int64_t level_power = std::max<int64_t>(4, ceil_log2(size) / levels);
  const int64_t level_step = int64_t{1} << level_power;
  const int64_t level_mask = level_step - 1;
  double acc[levels][rows][W] = {};
  auto load = [&](int64_t i, int k, int l) { return x[(i * rows + k) * W + l]; };
  int64_t i = 0;
  while (i + level_step <= size) {
    for (int64_t j = 0; j < level_step; ++j, ++i)
      for (int k = 0; k < rows; ++k)
        for (int l = 0; l < W; ++l) acc[0][k][l] += load(i, k, l);
    for (int j = 1; j < levels; ++j) {
      for (int k = 0; k < rows; ++k)
        for (int l = 0; l < W; ++l) {
          acc[j][k][l] += acc[j - 1][k][l];
          acc[j - 1][k][l] = 0.0;
        }
      if (i & (level_mask << (j * level_power))) break;
    }
  }
  for (; i < size; ++i)
    for (int k = 0; k < rows; ++k)
      for (int l = 0; l < W; ++l) acc[0][k][l] += load(i, k, l);
  for (int j = 1; j < levels; ++j)
    for (int k = 0; k < rows; ++k)
      for (int l = 0; l < W; ++l) acc[0][k][l] += acc[j][k][l];
  for (int l = 0; l < W; ++l) out[l] = acc[0][0][l];
  for (int64_t v = size * rows; v < vectors; ++v)
    for (int l = 0; l < W; ++l) out[l] += x[v * W + l];
  for (int k = 1; k < rows; ++k)
    for (int l = 0; l < W; ++l) out[l] += acc[0][k][l];
}

template <int W>
double cascade_sum_fixed(const double* x, int64_t n) {
  const int64_t vectors = n / W;
  double partial[W];
  cascade_row_sum<W>(x, vectors, partial);
  double total = 0.0;
  for (int64_t i = vectors * W; i < n; ++i) total += x[i];
  for (int l = 0; l < W; ++l) total += partial[l];
  return total;
}

}  // namespace

void shifted_exp(const double* x, double shift, double* out, int64_t n, bool sleef) {
  if (sleef)
    sleef_shifted_exp(x, shift, out, n);
  else
    libm_shifted_exp(x, shift, out, n);
}

double lane_sum(const double* x, int64_t begin, int64_t end, int lanes) {
  switch (lanes) {
    case 8: return lane_sum_fixed<8>(x, begin, end);
    case 4: return lane_sum_fixed<4>(x, begin, end);
    case 2: return lane_sum_fixed<2>(x, begin, end);
    default: return lane_sum_fixed<1>(x, begin, end);
  }
}

double cascade_sum(const double* x, int64_t n, int lanes) {
  if (n < lanes) return cascade_sum_fixed<1>(x, n);
  switch (lanes) {
    case 8: return cascade_sum_fixed<8>(x, n);
    case 4: return cascade_sum_fixed<4>(x, n);
    case 2: return cascade_sum_fixed<2>(x, n);
    default: return cascade_sum_fixed<1>(x, n);
  }
}

}  // namespace vivace
