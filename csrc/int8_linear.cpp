#include "int8_linear.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <pybind11/stl.h>

#include "avx512_sums.h"
#include "numpy_args.h"
#include "thread_pool.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define VIVACE_X86 1
#endif

namespace vivace {
namespace {

// Output channels per work item: 64 rows of int8 weights (64-256 KB at 1024-4096 inputs), enough that a wake-up is
// cheap beside it and few enough that a late thread finds items left.
constexpr int64_t kItemChannels = 64;

// Rows of activations as uint8 with a scale and zero point each: x ~ (xq - zero) * scale.
struct QuantizedRows {
  std::vector<uint8_t> values;  // [rows, in_features]
  std::vector<float> scale;
  std::vector<int32_t> zero;
};

#ifdef VIVACE_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")
namespace avx512_vnni {

// kChannels weight rows stream side by side against kRows activation rows: each 64-byte load of activations is
// used kChannels times, each of weights kRows times. The tail of a row is read with a byte mask (zeros past it).
// Row by row: the range always holds 0, so a zero activation (padding, ReLU) is exact; x * (1 / scale) rounds to
// nearest even (the default MXCSR mode), as torch.round.
QuantizedRows quantize_rows(const float* x, int64_t rows, int64_t in) {
  QuantizedRows q{std::vector<uint8_t>(rows * in), std::vector<float>(rows), std::vector<int32_t>(rows)};
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * in;
    __m512 low = _mm512_setzero_ps(), high = _mm512_setzero_ps();
    for (int64_t k = 0; k < in; k += 16) {
      const __mmask16 mask = in - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (in - k)) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(mask, row + k);
      low = _mm512_min_ps(low, v);
      high = _mm512_max_ps(high, v);
    }
    const float lowest = _mm512_reduce_min_ps(low), highest = _mm512_reduce_max_ps(high);
    const float scale = highest > lowest ? (highest - lowest) / 255.0f : 1.0f;
    const int32_t zero = static_cast<int32_t>(std::clamp(std::nearbyint(-lowest / scale), 0.0f, 255.0f));
    const __m512 inverse = _mm512_set1_ps(1.0f / scale);
    const __m512i zero_v = _mm512_set1_epi32(zero), top = _mm512_set1_epi32(255);
    uint8_t* out = q.values.data() + r * in;
    for (int64_t k = 0; k < in; k += 16) {
      const __mmask16 mask = in - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (in - k)) - 1);
      __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, row + k), inverse)),
                                   zero_v);
      v = _mm512_min_epi32(_mm512_max_epi32(v, _mm512_setzero_si512()), top);
      _mm_mask_storeu_epi8(out + k, mask, _mm512_cvtepi32_epi8(v));
    }
    q.scale[r] = scale;
    q.zero[r] = zero;
  }
  return q;
}

// Four weight rows stream side by side against kRows (1-4) activation rows: each 64-byte load of activations is used
// four times, each of weights kRows times. The tail of a row is read with a byte mask (zeros past it). The 16
// accumulators are named variables: as an array, GCC 12 keeps them on the stack and every vpdpbusd reads and
// writes memory.
template <int kRows>
void block(const Int8Linear& p, const QuantizedRows& q, int64_t n0, int64_t r0) {
  const int64_t in = p.in_features;
  const int8_t* w = p.weight + n0 * in;
  const uint8_t* xq = q.values.data() + r0 * in;
  // The next four weight rows, prefetched at the pace these four are read: the hardware prefetcher follows four short
  // interleaved streams (1-4 KB each) poorly.
  const int8_t* next = w + 4 * in;
  const __m512i zero = _mm512_setzero_si512();
  __m512i a00 = zero, a01 = zero, a02 = zero, a03 = zero, a10 = zero, a11 = zero, a12 = zero, a13 = zero;
  __m512i a20 = zero, a21 = zero, a22 = zero, a23 = zero, a30 = zero, a31 = zero, a32 = zero, a33 = zero;
  for (int64_t k = 0; k < in; k += 64) {
    const __mmask64 mask = in - k >= 64 ? ~__mmask64{0} : (__mmask64{1} << (in - k)) - 1;
    const __m512i x0 = _mm512_maskz_loadu_epi8(mask, xq + k);
    const __m512i x1 = kRows > 1 ? _mm512_maskz_loadu_epi8(mask, xq + in + k) : zero;
    const __m512i x2 = kRows > 2 ? _mm512_maskz_loadu_epi8(mask, xq + 2 * in + k) : zero;
    const __m512i x3 = kRows > 3 ? _mm512_maskz_loadu_epi8(mask, xq + 3 * in + k) : zero;
#define VIVACE_CHANNEL(c)                                                     \
  {                                                                           \
    const __m512i wv = _mm512_maskz_loadu_epi8(mask, w + c * in + k);         \
    a##c##0 = _mm512_dpbusd_epi32(a##c##0, x0, wv);                           \
    if constexpr (kRows > 1) a##c##1 = _mm512_dpbusd_epi32(a##c##1, x1, wv);  \
    if constexpr (kRows > 2) a##c##2 = _mm512_dpbusd_epi32(a##c##2, x2, wv);  \
    if constexpr (kRows > 3) a##c##3 = _mm512_dpbusd_epi32(a##c##3, x3, wv);  \
  }
    VIVACE_CHANNEL(0) VIVACE_CHANNEL(1) VIVACE_CHANNEL(2) VIVACE_CHANNEL(3)
#undef VIVACE_CHANNEL
    for (int line = 0; line < 4; ++line) _mm_prefetch(reinterpret_cast<const char*>(next + line * 64), _MM_HINT_T0);
    next += 256;
  }
  // all sixteen reduced at once (exact in int32, so the order does not matter): element 4 * c + r is (c, r)
  alignas(64) int32_t sums[16];
  _mm512_store_si512(sums, transpose_sums({a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31,
                                           a32, a33}, AddInt32{}));
  for (int c = 0; c < 4; ++c) {
    const int64_t n = n0 + c;
    for (int r = 0; r < kRows; ++r) {
      const int32_t sum = sums[4 * c + r] - q.zero[r0 + r] * p.weight_sums[n];
      const float value = static_cast<float>(sum) * (q.scale[r0 + r] * p.scales[n]);
      p.out[(r0 + r) * p.out_features + n] = p.bias ? value + p.bias[n] : value;
    }
  }
}

// One weight row against every activation row (the channels past the last block of four).
void single_channel(const Int8Linear& p, const QuantizedRows& q, int64_t n) {
  const int64_t in = p.in_features;
  const int8_t* w = p.weight + n * in;
  for (int64_t r = 0; r < p.rows; ++r) {
    const uint8_t* xq = q.values.data() + r * in;
    __m512i acc = _mm512_setzero_si512();
    for (int64_t k = 0; k < in; k += 64) {
      const __mmask64 mask = in - k >= 64 ? ~__mmask64{0} : (__mmask64{1} << (in - k)) - 1;
      acc = _mm512_dpbusd_epi32(acc, _mm512_maskz_loadu_epi8(mask, xq + k), _mm512_maskz_loadu_epi8(mask, w + k));
    }
    const int32_t sum = _mm512_reduce_add_epi32(acc) - q.zero[r] * p.weight_sums[n];
    const float value = static_cast<float>(sum) * (q.scale[r] * p.scales[n]);
    p.out[r * p.out_features + n] = p.bias ? value + p.bias[n] : value;
  }
}

// Output channels [begin, end) for every row.
void channels(const Int8Linear& p, const QuantizedRows& q, int64_t begin, int64_t end) {
  int64_t n = begin;
  for (; n + 4 <= end; n += 4) {
    int64_t r = 0;
    for (; r + 4 <= p.rows; r += 4) block<4>(p, q, n, r);
    if (p.rows - r == 3) block<3>(p, q, n, r);
    if (p.rows - r == 2) block<2>(p, q, n, r);
    if (p.rows - r == 1) block<1>(p, q, n, r);
  }
  for (; n < end; ++n) single_channel(p, q, n);
}

void run(const Int8Linear& p, int threads) {
  const QuantizedRows q = quantize_rows(p.x, p.rows, p.in_features);
  const int64_t items = (p.out_features + kItemChannels - 1) / kItemChannels;
  parallel_for(items, threads, [&](int64_t item) {
    channels(p, q, item * kItemChannels, std::min(p.out_features, (item + 1) * kItemChannels));
  });
}

}  // namespace avx512_vnni
#pragma GCC pop_options
#endif

struct Isa {
  const char* name;
  void (*run)(const Int8Linear&, int threads);
};

const std::vector<Isa>& supported() {
  static const std::vector<Isa> isas = [] {
    std::vector<Isa> found;
#ifdef VIVACE_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vnni"))
      found.push_back({"avx512_vnni", &avx512_vnni::run});
#endif
    return found;
  }();
  return isas;
}

py::array_t<float> linear(py::handle x_object, py::handle weight_object, py::handle scales_object,
                          py::handle weight_sums_object, py::object bias_object, int num_threads) {
  if (num_threads < 1) throw py::value_error("num_threads must be >= 1");
  if (supported().empty()) throw py::value_error("int8_linear needs AVX-512 VNNI, which this CPU does not have");
  const auto x = typed_array<float>(x_object, "x", "float32", 2, true);
  const auto weight = typed_array<int8_t>(weight_object, "weight", "int8", 2, false);
  const auto scales = typed_array<float>(scales_object, "scales", "float32", 1, true);
  const auto weight_sums = typed_array<int32_t>(weight_sums_object, "weight_sums", "int32", 1, true);
  const int64_t rows = x.shape(0), in = x.shape(1), out_features = weight.shape(0);
  if (weight.shape(1) != in)
    throw py::value_error("weight " + shape_of(weight) + " must have " + std::to_string(in) +
                          " columns, one per column of x " + shape_of(x));
  const auto per_channel = [&](const py::array& array, const char* name) {
    if (array.shape(0) != out_features)
      throw py::value_error(std::string(name) + " " + shape_of(array) + " must have one value per weight row (" +
                            std::to_string(out_features) + ")");
  };
  per_channel(scales, "scales");
  per_channel(weight_sums, "weight_sums");
  py::array_t<float, py::array::c_style> bias;
  if (!bias_object.is_none()) {
    bias = typed_array<float>(bias_object, "bias", "float32", 1, true);
    per_channel(bias, "bias");
  }
  py::array_t<float> out({rows, out_features});
  const Int8Linear problem{x.data(),        weight.data(), scales.data(), weight_sums.data(),
                           bias_object.is_none() ? nullptr : bias.data(), out.mutable_data(), rows, in, out_features};
  {
    py::gil_scoped_release release;
    int8_linear(problem, num_threads);
  }
  return out;
}

}  // namespace

std::vector<std::string> int8_linear_isas() {
  std::vector<std::string> names;
  for (const Isa& isa : supported()) names.emplace_back(isa.name);
  return names;
}

void int8_linear(const Int8Linear& problem, int threads) {
  if (supported().empty()) throw std::invalid_argument("int8_linear needs AVX-512 VNNI");
  supported().front().run(problem, std::max(1, threads));
}

void register_int8_linear(py::module_& m) {
  m.def("int8_linear", &linear, py::arg("x"), py::arg("weight"), py::arg("scales"), py::arg("weight_sums"),
        py::arg("bias") = py::none(), py::arg("num_threads") = 1,
        "An int8 linear with per-row dynamic uint8 activations: x float32 [rows, in] is quantized per row\n"
        "(asymmetric, its range and 0 over 255 steps), multiplied with weight int8 [out, in] (C-contiguous, read in\n"
        "place) in exact int32 sums, then scaled by the row's scale and scales[n] (+ bias). weight_sums int32 [out]\n"
        "= weight.sum(1). Returns float32 [rows, out].");
  m.def("int8_linear_isas", &int8_linear_isas, "The instruction sets int8_linear runs on this CPU, best first.");
}

}  // namespace vivace
