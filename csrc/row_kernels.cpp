#include "row_kernels.h"

#include <limits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
// Comparisons may then be if-converted into vector selects; no result changes.
#define VECTOR_LOOP __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), optimize("no-trapping-math")))
#else
#define VECTOR_LOOP
#endif

namespace vivace {

VECTOR_LOOP double sum(const double* x, int64_t n) {
  double lanes[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += x[i + l];
  for (; i < n; ++i) lanes[0] += x[i];
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

VECTOR_LOOP void widen(const float* x, int64_t n, double* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = x[i];
}

VECTOR_LOOP void guide(const float* cond, const float* uncond, int64_t n, double scale, double* out) {
  for (int64_t i = 0; i < n; ++i) {
    const double u = uncond[i];
    out[i] = u + scale * (static_cast<double>(cond[i]) - u);
  }
}

VECTOR_LOOP void guide_float32(const float* cond, const float* uncond, int64_t n, float scale, double* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float difference = cond[i] - uncond[i];
    const float scaled = difference * scale;
    out[i] = static_cast<double>(uncond[i] + scaled);  // separate roundings: the build does not contract (setup.py)
  }
}

VECTOR_LOOP void divide(double* x, int64_t n, double divisor) {
  for (int64_t i = 0; i < n; ++i) x[i] /= divisor;
}

VECTOR_LOOP void multiply(double* x, int64_t n, double factor) {
  for (int64_t i = 0; i < n; ++i) x[i] *= factor;
}

namespace {

double scalar_max(const double* x, int64_t n) {
  double max = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    if (x[i] != x[i]) return x[i];
    max = x[i] > max ? x[i] : max;
  }
  return max;
}

int64_t scalar_indices_at_least(const double* x, int64_t lo, int64_t hi, double threshold, int64_t* out) {
  int64_t m = 0;
  for (int64_t i = lo; i < hi; ++i) {
    out[m] = i;
    m += x[i] >= threshold;
  }
  return m;
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f"))) double avx512_max(const double* x, int64_t n) {
  __m512d max = _mm512_set1_pd(-std::numeric_limits<double>::infinity());
  __mmask8 nan = 0;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m512d v = _mm512_loadu_pd(x + i);
    nan |= _mm512_cmp_pd_mask(v, v, _CMP_UNORD_Q);
    max = _mm512_max_pd(max, v);
  }
  if (nan) return std::numeric_limits<double>::quiet_NaN();
  const double tail = scalar_max(x + i, n - i);
  const double head = _mm512_reduce_max_pd(max);
  return tail != tail ? tail : (tail > head ? tail : head);
}

// Compress into a register and store all 8 lanes: the memory form of vpcompressq is slow on some cores.
__attribute__((target("avx512f"))) int64_t avx512_indices_at_least(const double* x, int64_t lo, int64_t hi,
                                                                      double threshold, int64_t* out) {
  const __m512d limit = _mm512_set1_pd(threshold);
  __m512i index = _mm512_add_epi64(_mm512_set1_epi64(lo), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
  const __m512i eight = _mm512_set1_epi64(8);
  int64_t m = 0, i = lo;
  for (; i + 8 <= hi; i += 8) {
    const __mmask8 keep = _mm512_cmp_pd_mask(_mm512_loadu_pd(x + i), limit, _CMP_GE_OQ);
    _mm512_storeu_si512(out + m, _mm512_maskz_compress_epi64(keep, index));
    m += __builtin_popcount(keep);
    index = _mm512_add_epi64(index, eight);
  }
  return m + scalar_indices_at_least(x, i, hi, threshold, out + m);
}
#endif

}  // namespace

double scale_and_max(double* x, int64_t n, double temperature) {
  if (temperature != 1.0) divide(x, n, temperature);
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512) return avx512_max(x, n);
#endif
  return scalar_max(x, n);
}

int64_t indices_at_least(const double* x, int64_t lo, int64_t hi, double threshold, int64_t* out) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512) return avx512_indices_at_least(x, lo, hi, threshold, out);
#endif
  return scalar_indices_at_least(x, lo, hi, threshold, out);
}

}  // namespace vivace
