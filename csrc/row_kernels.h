#pragma once
#include <cstdint>

// Whole-row loops of the sampler, built for AVX512 / AVX2 where the CPU has them. Results do not depend
// on the build: every element sees the same IEEE operations.
namespace vivace {

// out[i] = x[i] widened to float64.
void widen(const float* x, int64_t n, double* out);

// out[i] = uncond[i] + scale * (cond[i] - uncond[i]) in float64.
void guide(const float* cond, const float* uncond, int64_t n, double scale, double* out);

// out[i] = uncond[i] + (cond[i] - uncond[i]) * scale, each operation rounded to float32 (torch's float32 tensor
// arithmetic with a Python scalar, as the guidance mix of float32 logits runs in torch), widened to float64.
void guide_float32(const float* cond, const float* uncond, int64_t n, float scale, double* out);

// x[i] /= temperature (skipped for 1); returns the maximum, or NaN if any x[i] is NaN.
double scale_and_max(double* x, int64_t n, double temperature);

// x[i] *= factor.
void multiply(double* x, int64_t n, double factor);

// Sum of x[0, n) in an unspecified order.
double sum(const double* x, int64_t n);

// Writes the indices i in [lo, hi) with x[i] >= threshold to out in increasing order; returns how many.
// out needs room for hi - lo + 8 entries.
int64_t indices_at_least(const double* x, int64_t lo, int64_t hi, double threshold, int64_t* out);

}  // namespace vivace
