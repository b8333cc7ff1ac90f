#include "float32_linear.h"

#include <pybind11/numpy.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>

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

inline float widen(uint16_t bits) {  // bfloat16 -> float32, exact
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof value);
  return value;
}

// Weight row n as float32 values, read in place (float32) or widened as read (bfloat16).
struct Float32Weights {
  const float* weight;
  float at(int64_t i) const { return weight[i]; }
};
struct BFloat16Weights {
  const uint16_t* weight;
  float at(int64_t i) const { return widen(weight[i]); }
};

// Lane l of (r, n) sums x[r, k] * w[n, k] over k = l (mod 16) in order, one rounding per product-add as an FMA
// rounds; the products past in_features are zeros.
template <class Weights>
void portable_item(const Float32Linear& p, Weights weights, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t row = n * p.in_features;
    for (int64_t r = 0; r < p.rows; ++r) {
      const float* x = p.x + r * p.in_features;
      float lanes[kLanes] = {};
      for (int64_t k = 0; k < p.in_features; ++k)
        lanes[k % kLanes] = std::fma(x[k], weights.at(row + k), lanes[k % kLanes]);
      store(p, r, n, reduce(lanes));
    }
  }
}

#ifdef VIVACE_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")
namespace avx512 {

// reduce()'s tree in registers: lanes l + l+8, then l + l+4, l + l+2, l + l+1.
inline float reduce_vector(__m512 sum) {
  const __m256 eight = _mm256_add_ps(_mm512_castps512_ps256(sum),
                                     _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(sum), 1)));
  const __m128 four = _mm_add_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
  const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
}

// Sixteen weights as float32 from offset i of the weights (masked: zeros past the mask).
struct Float32Lanes {
  static constexpr bool kPrefetch = false;
  const float* weight;
  void prefetch(int64_t) const {}
  __m512 load(int64_t i) const { return _mm512_loadu_ps(weight + i); }
  __m512 load(int64_t i, __mmask16 mask) const { return _mm512_maskz_loadu_ps(mask, weight + i); }
};
// bfloat16 bits shifted into the high half of each float32 lane: exact. Each weight row is only 2-8 KB of bfloat16,
// too short for the hardware prefetcher to ramp up on four rows at once, so the block asks for the next block's rows
// at its own position as it goes (19.5 against 15.3 GB/s over MusicGen-small's step linears, 2 rows, 2 threads);
// float32 rows, twice as long, gained nothing from it.
struct BFloat16Lanes {
  static constexpr bool kPrefetch = true;
  const uint16_t* weight;
  // i may lie past the weights' end (the last block's next rows): a prefetch never faults
  void prefetch(int64_t i) const { _mm_prefetch(reinterpret_cast<const char*>(weight + i), _MM_HINT_T0); }
  static __m512 wide(__m256i bits) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)); }
  __m512 load(int64_t i) const { return wide(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(weight + i))); }
  __m512 load(int64_t i, __mmask16 mask) const { return wide(_mm256_maskz_loadu_epi16(mask, weight + i)); }
};

// kChannels weight rows against kRows activation rows, sixteen inputs per step: kRows x kChannels accumulators
// (24 at most, with 4 weights and an activation: 29 of the 32 registers).
template <int kRows, int kChannels, class Lanes>
void block(const Float32Linear& p, Lanes weight, int64_t n, int64_t r) {
  const int64_t in = p.in_features, whole = in / kLanes * kLanes;
  const __mmask16 tail = static_cast<__mmask16>((1u << (in - whole)) - 1);
  __m512 acc[kRows][kChannels];
  for (int i = 0; i < kRows; ++i)
    for (int c = 0; c < kChannels; ++c) acc[i][c] = _mm512_setzero_ps();
  weight.weight += n * in;
  const float* x = p.x + r * in;
  for (int64_t k = 0; k < whole; k += kLanes) {
    __m512 w[kChannels];
    if constexpr (Lanes::kPrefetch) {
      if (k % 32 == 0)
        for (int c = 0; c < kChannels; ++c) weight.prefetch((kChannels + c) * in + k);
    }
    for (int c = 0; c < kChannels; ++c) w[c] = weight.load(c * in + k);
    for (int i = 0; i < kRows; ++i) {
      const __m512 row = _mm512_loadu_ps(x + i * in + k);
      for (int c = 0; c < kChannels; ++c) acc[i][c] = _mm512_fmadd_ps(row, w[c], acc[i][c]);
    }
  }
  if (tail) {  // the inputs past the last sixteen, zeros beyond in_features
    __m512 w[kChannels];
    for (int c = 0; c < kChannels; ++c) w[c] = weight.load(c * in + whole, tail);
    for (int i = 0; i < kRows; ++i) {
      const __m512 row = _mm512_maskz_loadu_ps(tail, x + i * in + whole);
      for (int c = 0; c < kChannels; ++c) acc[i][c] = _mm512_fmadd_ps(row, w[c], acc[i][c]);
    }
  }
  for (int i = 0; i < kRows; ++i)
    for (int c = 0; c < kChannels; ++c) store(p, r + i, n + c, reduce_vector(acc[i][c]));
}

template <int kChannels, class Lanes>
void channels(const Float32Linear& p, Lanes weight, int64_t n) {
  int64_t r = 0;  // every row group against these channels while their weights are in L1
  for (; r + 6 <= p.rows; r += 6) block<6, kChannels>(p, weight, n, r);
  switch (p.rows - r) {
    case 5: return block<5, kChannels>(p, weight, n, r);
    case 4: return block<4, kChannels>(p, weight, n, r);
    case 3: return block<3, kChannels>(p, weight, n, r);
    case 2: return block<2, kChannels>(p, weight, n, r);
    case 1: return block<1, kChannels>(p, weight, n, r);
    default: return;
  }
}

template <class Lanes>
void item(const Float32Linear& p, Lanes weight, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) channels<4>(p, weight, n);
  for (; n < n1; ++n) channels<1>(p, weight, n);
}

void item(const Float32Linear& p, int64_t n0, int64_t n1) {
  if (p.weight_bf16) return item(p, BFloat16Lanes{p.weight_bf16}, n0, n1);
  item(p, Float32Lanes{p.weight}, n0, n1);
}

}  // namespace avx512
#pragma GCC pop_options
#endif

// T: float (float32 weights) or uint16_t (bfloat16 bits).
template <class T>
py::array_t<float> linear(py::handle x_object, py::handle weight_object, py::object bias_object, int num_threads,
                          bool portable) {
  if (num_threads < 1) throw py::value_error("num_threads must be >= 1");
  const auto x = typed_array<float>(x_object, "x", "float32", 2, true);
  const bool bf16 = std::is_same_v<T, uint16_t>;
  const auto weight = typed_array<T>(weight_object, "weight", bf16 ? "uint16 (bfloat16 bits)" : "float32", 2, false);
  const int64_t rows = x.shape(0), in = x.shape(1), out_features = weight.shape(0);
  check_weight_columns(weight, x);
  const auto bias = optional_bias(bias_object, out_features);
  py::array_t<float> out({rows, out_features});
  Float32Linear problem{x.data(), nullptr, bias_object.is_none() ? nullptr : bias.data(), out.mutable_data(), rows, in,
                        out_features};
  if constexpr (std::is_same_v<T, uint16_t>)
    problem.weight_bf16 = weight.data();
  else
    problem.weight = weight.data();
  {
    py::gil_scoped_release release;
    float32_linear(problem, num_threads, portable);
  }
  return out;
}

}  // namespace

bool float32_linear_fast() {
#ifdef VIVACE_X86
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl");
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
    if (p.weight_bf16) return portable_item(p, BFloat16Weights{p.weight_bf16}, n0, n1);
    portable_item(p, Float32Weights{p.weight}, n0, n1);
  });
}

void register_float32_linear(py::module_& m) {
  m.def("float32_linear", &linear<float>, py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(),
        py::arg("num_threads") = 1, py::arg("portable") = false,
        "x float32 [rows, in] @ weight float32 [out, in] (C-contiguous, read in place).T (+ bias): each output\n"
        "summed in one fixed order (sixteen FMA lanes over the inputs, then a fixed tree), the same bits for a row\n"
        "alone or in any batch, on any thread count, with or without AVX-512 (portable=True runs the portable form\n"
        "where AVX-512 is present too). Returns float32 [rows, out].");
  m.def("bfloat16_weight_linear", &linear<uint16_t>, py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(),
        py::arg("num_threads") = 1, py::arg("portable") = false,
        "float32_linear with bfloat16 weights: weight uint16 [out, in] holding their bits (a bfloat16 tensor's\n"
        ".view(torch.int16)), each widened exactly to float32 as it is read; the same sums in the same order, so\n"
        "the same bits as float32_linear on the widened weights. Returns float32 [rows, out].");
  m.def("float32_linear_fast", &float32_linear_fast,
        "Whether float32_linear runs its AVX-512 form here (its portable form is far slower than F.linear).");
}

}  // namespace vivace
