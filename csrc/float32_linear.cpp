#include "float32_linear.h"

#include <pybind11/numpy.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "numpy_args.h"
#include "thread_pool.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define VIVACE_X86 1
#endif

namespace vivace {
namespace {

// Output channels per work item: 32 rows of 1024-4096 float32 weights (128-512 KB), enough that a wake-up is cheap
// beside it and few enough that a late thread finds items left.
constexpr int64_t kItemChannels = 32;
constexpr int kLanes = 16;

// Sixteen lanes added by a fixed tree: the portable form and the AVX-512 form sum the same way.
inline float reduce(float* lanes) {
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  return lanes[0];
}

inline void store(const Float32Linear& p, int64_t r, int64_t n, float sum) {
  p.out[r * p.out_features + n] = p.bias ? sum + p.bias[n] : sum;
}

// Lane l of (r, n) sums x[r, k] * w[n, k] over k = l (mod 16) in order, one rounding per product-add as an FMA
// rounds; the products past in_features are zeros.
void portable_item(const Float32Linear& p, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* w = p.weight + n * p.in_features;
    for (int64_t r = 0; r < p.rows; ++r) {
      const float* x = p.x + r * p.in_features;
      float lanes[kLanes] = {};
      for (int64_t k = 0; k < p.in_features; ++k) lanes[k % kLanes] = std::fma(x[k], w[k], lanes[k % kLanes]);
      store(p, r, n, reduce(lanes));
    }
  }
}

#ifdef VIVACE_X86
#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {

// reduce()'s tree in registers: lanes l + l+8, then l + l+4, l + l+2, l + l+1.
inline float reduce_vector(__m512 sum) {
  const __m256 eight = _mm256_add_ps(_mm512_castps512_ps256(sum),
                                     _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(sum), 1)));
  const __m128 four = _mm_add_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
  const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
}

// kChannels weight rows against kRows activation rows, sixteen inputs per step: kRows x kChannels accumulators
// (24 at most, with 4 weights and an activation: 29 of the 32 registers).
template <int kRows, int kChannels>
void block(const Float32Linear& p, int64_t n, int64_t r) {
  const int64_t in = p.in_features, whole = in / kLanes * kLanes;
  const __mmask16 tail = static_cast<__mmask16>((1u << (in - whole)) - 1);
  __m512 acc[kRows][kChannels];
  for (int i = 0; i < kRows; ++i)
    for (int c = 0; c < kChannels; ++c) acc[i][c] = _mm512_setzero_ps();
  const float* weight = p.weight + n * in;
  const float* x = p.x + r * in;
  for (int64_t k = 0; k < whole; k += kLanes) {
    __m512 w[kChannels];
    for (int c = 0; c < kChannels; ++c) w[c] = _mm512_loadu_ps(weight + c * in + k);
    for (int i = 0; i < kRows; ++i) {
      const __m512 row = _mm512_loadu_ps(x + i * in + k);
      for (int c = 0; c < kChannels; ++c) acc[i][c] = _mm512_fmadd_ps(row, w[c], acc[i][c]);
    }
  }
  if (tail) {  // the inputs past the last sixteen, zeros beyond in_features
    __m512 w[kChannels];
    for (int c = 0; c < kChannels; ++c) w[c] = _mm512_maskz_loadu_ps(tail, weight + c * in + whole);
    for (int i = 0; i < kRows; ++i) {
      const __m512 row = _mm512_maskz_loadu_ps(tail, x + i * in + whole);
      for (int c = 0; c < kChannels; ++c) acc[i][c] = _mm512_fmadd_ps(row, w[c], acc[i][c]);
    }
  }
  for (int i = 0; i < kRows; ++i)
    for (int c = 0; c < kChannels; ++c) store(p, r + i, n + c, reduce_vector(acc[i][c]));
}

template <int kChannels>
void channels(const Float32Linear& p, int64_t n) {
  int64_t r = 0;  // every row group against these channels while their weights are in L1
  for (; r + 6 <= p.rows; r += 6) block<6, kChannels>(p, n, r);
  switch (p.rows - r) {
    case 5: return block<5, kChannels>(p, n, r);
    case 4: return block<4, kChannels>(p, n, r);
    case 3: return block<3, kChannels>(p, n, r);
    case 2: return block<2, kChannels>(p, n, r);
    case 1: return block<1, kChannels>(p, n, r);
    default: return;
  }
}

void item(const Float32Linear& p, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) channels<4>(p, n);
  for (; n < n1; ++n) channels<1>(p, n);
}

}  // namespace avx512
#pragma GCC pop_options
#endif

py::array_t<float> linear(py::handle x_object, py::handle weight_object, py::object bias_object, int num_threads,
                          bool portable) {
  if (num_threads < 1) throw py::value_error("num_threads must be >= 1");
  const auto x = typed_array<float>(x_object, "x", "float32", 2, true);
  const auto weight = typed_array<float>(weight_object, "weight", "float32", 2, false);
  const int64_t rows = x.shape(0), in = x.shape(1), out_features = weight.shape(0);
  check_weight_columns(weight, x);
  const auto bias = optional_bias(bias_object, out_features);
  py::array_t<float> out({rows, out_features});
  const Float32Linear problem{x.data(), weight.data(), bias_object.is_none() ? nullptr : bias.data(),
                              out.mutable_data(), rows, in, out_features};
  {
    py::gil_scoped_release release;
    float32_linear(problem, num_threads, portable);
  }
  return out;
}

}  // namespace

bool float32_linear_fast() {
#ifdef VIVACE_X86
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return avx512;
#else
  return false;
#endif
}

void float32_linear(const Float32Linear& p, int threads, bool portable) {
  const bool fast = !portable && float32_linear_fast();
  parallel_for((p.out_features + kItemChannels - 1) / kItemChannels, threads, [&](int64_t item) {
    const int64_t n0 = item * kItemChannels, n1 = std::min(p.out_features, n0 + kItemChannels);
#ifdef VIVACE_X86
    if (fast) return avx512::item(p, n0, n1);
#endif
    portable_item(p, n0, n1);
  });
}

void register_float32_linear(py::module_& m) {
  m.def("float32_linear", &linear, py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(),
        py::arg("num_threads") = 1, py::arg("portable") = false,
        "x float32 [rows, in] @ weight float32 [out, in] (C-contiguous, read in place).T (+ bias): each output\n"
        "summed in one fixed order (sixteen FMA lanes over the inputs, then a fixed tree), the same bits for a row\n"
        "alone or in any batch, on any thread count, with or without AVX-512 (portable=True runs the portable form\n"
        "where AVX-512 is present too). Returns float32 [rows, out].");
  m.def("float32_linear_fast", &float32_linear_fast,
        "Whether float32_linear runs its AVX-512 form here (its portable form is far slower than F.linear).");
}

}  // namespace vivace
