#pragma once
#include <cstdint>

// The float64 arithmetic of torch's CPU kernels that vivace.sampling.sample goes through, reproduced
// operation for operation so that the native sampler rounds exactly as the reference does.
namespace vivace {

// torch picks a kernel build per operator: softmax is also built for AVX512, sum is not, so on an AVX512
// CPU softmax reduces over 8 lanes and sum over 4.
struct TorchNumerics {
  int softmax_lanes;  // doubles per Vectorized<double> in torch.softmax's kernel
  int sum_lanes;      // doubles per Vectorized<double> in torch.sum's kernel
  bool sleef_exp;     // Vectorized<double>::exp is SLEEF's u10 exp (false: std::exp, the DEFAULT build)
};

// out[i] = exp(x[i] - shift) as torch.softmax computes it; requires x[i] <= shift, no NaN.
void shifted_exp(const double* x, double shift, double* out, int64_t n, bool sleef);

// Sum of x[begin, end) of a row whose other entries are zero, in at::vec::reduce_all's order:
// lane j % lanes accumulates x[j] in index order, then the lanes are added in lane order.
double lane_sum(const double* x, int64_t begin, int64_t end, int lanes);

// Sum of x[0, n) in at::sum's order for a contiguous float64 row (SumKernel's cascade_sum).
double cascade_sum(const double* x, int64_t n, int lanes);

}  // namespace vivace
