#include "causal_conv.h"

#include <pybind11/numpy.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "numpy_args.h"
#include "thread_pool.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define VIVACE_X86 1
#endif

#include "exp_nonpositive.h"

namespace vivace {
namespace {

// A work item computes kTile output samples (four 16-lane vectors) of a range of output channels, kGroup channels
// at a time: sixteen accumulators, each input vector loaded once per group and each weight broadcast once per tile.
constexpr int64_t kTile = 64;
constexpr int64_t kGroup = 4;
constexpr int kLanes = 16;

// out[b, o, t] = bias[o] (+ residual[b, o, t]) + sum over i, j of weight[o, i, j] * f(in[b, i, t + j * dilation]),
// f = ELU (alpha 1) or the identity, in = the left context followed by x: a causal convolution over a stream.
struct Conv {
  const float* context;  // [batch, in_channels, context_length] or nullptr (context_length 0)
  const float* x;  // [batch, in_channels, in_length - context_length]
  const float* weight;  // [out_channels, in_channels, kernel]
  const float* bias;  // [out_channels] or nullptr
  const float* residual;  // [batch, out_channels, out_length] or nullptr
  float* out;  // [batch, out_channels, out_length]
  int64_t batch, in_channels, out_channels, kernel, dilation, context_length, in_length, out_length;
  bool elu;

  int64_t window() const { return kTile + (kernel - 1) * dilation; }  // input samples one tile reads per channel
};

// One tile's inputs, f applied, zeros past the end: [in_channels, window], so the loads need no masks.
void fill_window(const Conv& c, int64_t b, int64_t t0, float* window) {
  const int64_t width = c.window();
  const int64_t valid = std::min(width, c.in_length - t0), from_context = std::clamp<int64_t>(c.context_length - t0, 0, valid);
  const int64_t x_length = c.in_length - c.context_length;
  for (int64_t i = 0; i < c.in_channels; ++i) {
    float* to = window + i * width;
    const int64_t row = b * c.in_channels + i;
    for (int64_t s = 0; s < from_context; ++s) to[s] = c.context[row * c.context_length + t0 + s];
    for (int64_t s = from_context; s < valid; ++s) to[s] = c.x[row * x_length + t0 + s - c.context_length];
    for (int64_t s = valid; s < width; ++s) to[s] = 0.0f;
  }
}

// Sums are added in one fixed order, (input channel, tap) ascending, each product-add rounded once as an FMA
// rounds: the portable form and the AVX-512 form give the same bits.
void portable_tile(const Conv& c, int64_t b, int64_t t0, int64_t o0, int64_t o1, float* window) {
  fill_window(c, b, t0, window);
  const int64_t width = c.window(), count = std::min(kTile, c.out_length - t0);
  if (c.elu)
    for (int64_t s = 0; s < c.in_channels * width; ++s)
      if (!(window[s] > 0.0f)) window[s] = exp_nonpositive_scalar(window[s]) - 1.0f;
  for (int64_t o = o0; o < o1; ++o) {
    const float* w = c.weight + o * c.in_channels * c.kernel;
    for (int64_t t = 0; t < count; ++t) {
      float sum = c.bias ? c.bias[o] : 0.0f;
      if (c.residual) sum += c.residual[(b * c.out_channels + o) * c.out_length + t0 + t];
      for (int64_t i = 0; i < c.in_channels; ++i)
        for (int64_t j = 0; j < c.kernel; ++j) sum = std::fma(w[i * c.kernel + j], window[i * width + t + j * c.dilation], sum);
      c.out[(b * c.out_channels + o) * c.out_length + t0 + t] = sum;
    }
  }
}

#ifdef VIVACE_X86
#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {

void elu_window(float* window, int64_t n) {  // n: a multiple of 16 (the window is allocated so)
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  for (int64_t s = 0; s < n; s += kLanes) {
    const __m512 v = _mm512_loadu_ps(window + s);
    const __mmask16 negative = _mm512_cmp_ps_mask(v, zero, _CMP_NGT_UQ);  // the portable form's !(v > 0)
    _mm512_storeu_ps(window + s, _mm512_mask_sub_ps(v, negative, exp_nonpositive(v), one));
  }
}

// Channels o, o + 1, ... (kGroupValid of them; the rest of the group repeats the last one's weights and is not
// stored) of one tile.
void group(const Conv& c, int64_t b, int64_t t0, int64_t o, int64_t valid_channels, const float* window) {
  const int64_t width = c.window(), count = std::min(kTile, c.out_length - t0);
  const float* w[kGroup];
  __m512 acc[kGroup][4];
  for (int64_t g = 0; g < kGroup; ++g) {
    const int64_t channel = o + std::min(g, valid_channels - 1);
    w[g] = c.weight + channel * c.in_channels * c.kernel;
    for (int v = 0; v < 4; ++v) {
      const int64_t lanes = std::clamp<int64_t>(count - v * kLanes, 0, kLanes);
      const __mmask16 mask = static_cast<__mmask16>((1u << lanes) - 1);
      __m512 start = _mm512_set1_ps(c.bias ? c.bias[channel] : 0.0f);
      if (c.residual)
        start = _mm512_add_ps(start, _mm512_maskz_loadu_ps(mask, c.residual + (b * c.out_channels + channel) * c.out_length + t0 + v * kLanes));
      acc[g][v] = start;
    }
  }
  for (int64_t i = 0; i < c.in_channels; ++i) {
    for (int64_t j = 0; j < c.kernel; ++j) {
      const float* in = window + i * width + j * c.dilation;
      const __m512 x0 = _mm512_loadu_ps(in), x1 = _mm512_loadu_ps(in + 16);
      const __m512 x2 = _mm512_loadu_ps(in + 32), x3 = _mm512_loadu_ps(in + 48);
      for (int64_t g = 0; g < kGroup; ++g) {
        const __m512 weight = _mm512_set1_ps(w[g][i * c.kernel + j]);
        acc[g][0] = _mm512_fmadd_ps(weight, x0, acc[g][0]);
        acc[g][1] = _mm512_fmadd_ps(weight, x1, acc[g][1]);
        acc[g][2] = _mm512_fmadd_ps(weight, x2, acc[g][2]);
        acc[g][3] = _mm512_fmadd_ps(weight, x3, acc[g][3]);
      }
    }
  }
  for (int64_t g = 0; g < valid_channels; ++g) {
    float* out = c.out + (b * c.out_channels + o + g) * c.out_length + t0;
    for (int v = 0; v < 4; ++v) {
      const int64_t lanes = std::clamp<int64_t>(count - v * kLanes, 0, kLanes);
      _mm512_mask_storeu_ps(out + v * kLanes, static_cast<__mmask16>((1u << lanes) - 1), acc[g][v]);
    }
  }
}

void tile(const Conv& c, int64_t b, int64_t t0, int64_t o0, int64_t o1, float* window) {
  fill_window(c, b, t0, window);
  if (c.elu) elu_window(window, (c.in_channels * c.window() + kLanes - 1) / kLanes * kLanes);
  for (int64_t o = o0; o < o1; o += kGroup) group(c, b, t0, o, std::min(kGroup, o1 - o), window);
}

}  // namespace avx512
#pragma GCC pop_options
#endif

bool avx512_present() {
#ifdef VIVACE_X86
  static const bool present = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
  }();
  return present;
#else
  return false;
#endif
}

void run(const Conv& c, int threads, bool portable) {
  if (c.batch == 0 || c.out_channels == 0 || c.out_length == 0) return;  // an empty output
  const int64_t tiles = (c.out_length + kTile - 1) / kTile, groups = (c.out_channels + kGroup - 1) / kGroup;
  // Short inputs (the first layers run at the frame rate) have few tiles: their channels are split too, so that
  // every thread has work; each part fills its own window.
  const int64_t wanted = 4 * static_cast<int64_t>(std::max(threads, 1));
  const int64_t parts = std::clamp<int64_t>((wanted + c.batch * tiles - 1) / (c.batch * tiles), 1, groups);
  const int64_t groups_per_part = (groups + parts - 1) / parts;
  const int64_t window_floats = (c.in_channels * c.window() + kLanes - 1) / kLanes * kLanes;
  const bool fast = !portable && avx512_present();
  parallel_for(c.batch * tiles * parts, threads, [&](int64_t item) {
    const int64_t part = item % parts, tile = item / parts % tiles, b = item / parts / tiles;
    const int64_t o0 = part * groups_per_part * kGroup, o1 = std::min(c.out_channels, o0 + groups_per_part * kGroup);
    if (o0 >= o1) return;
    thread_local std::vector<float> window;
    if (static_cast<int64_t>(window.size()) < window_floats) window.resize(window_floats);
#ifdef VIVACE_X86
    if (fast) return avx512::tile(c, b, tile * kTile, o0, o1, window.data());
#endif
    portable_tile(c, b, tile * kTile, o0, o1, window.data());
  });
}

py::array_t<float> causal_conv1d(const py::object& x_object, const py::object& weight_object, const py::object& bias_object,
                                 int64_t dilation, bool elu, const py::object& residual_object,
                                 const py::object& context_object, int num_threads, bool portable) {
  const auto x = typed_array<float>(x_object, "x", "float32", 3, false);
  py::array_t<float, py::array::c_style> context;
  int64_t context_length = 0;
  if (!context_object.is_none()) {
    context = typed_array<float>(context_object, "context", "float32", 3, false);
    if (context.shape(0) != x.shape(0) || context.shape(1) != x.shape(1))
      throw py::value_error("context " + shape_of(context) + " must have the batch and channels of x " + shape_of(x));
    context_length = context.shape(2);
  }
  const auto weight = typed_array<float>(weight_object, "weight", "float32", 3, false);
  if (weight.shape(1) != x.shape(1))
    throw py::value_error("weight " + shape_of(weight) + " must have " + std::to_string(x.shape(1)) +
                          " input channels, one per channel of x " + shape_of(x));
  if (dilation < 1) throw py::value_error("dilation must be at least 1, got " + std::to_string(dilation));
  const int64_t in_length = context_length + x.shape(2);
  Conv c{context_length ? context.data() : nullptr, x.data(), weight.data(), nullptr, nullptr, nullptr, x.shape(0),
         x.shape(1), weight.shape(0), weight.shape(2), dilation, context_length, in_length,
         in_length - (weight.shape(2) - 1) * dilation, elu};
  if (c.out_length < 0)
    throw py::value_error("context and x (" + std::to_string(in_length) + " samples) are shorter than the kernel's reach of " +
                          std::to_string((c.kernel - 1) * dilation + 1) + " samples");
  const auto bias = optional_bias(bias_object, c.out_channels);
  if (!bias_object.is_none()) c.bias = bias.data();
  py::array_t<float, py::array::c_style> residual;
  if (!residual_object.is_none()) {
    residual = typed_array<float>(residual_object, "residual", "float32", 3, false);
    if (residual.shape(0) != c.batch || residual.shape(1) != c.out_channels || residual.shape(2) != c.out_length)
      throw py::value_error("residual " + shape_of(residual) + " must have the output's shape (" +
                            std::to_string(c.batch) + ", " + std::to_string(c.out_channels) + ", " +
                            std::to_string(c.out_length) + ")");
    c.residual = residual.data();
  }
  py::array_t<float> out({c.batch, c.out_channels, c.out_length});
  c.out = out.mutable_data();
  {
    py::gil_scoped_release release;
    run(c, num_threads, portable);
  }
  return out;
}

}  // namespace

void register_causal_conv(py::module_& m) {
  m.def("causal_conv1d", &causal_conv1d, py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(),
        py::arg("dilation") = 1, py::arg("elu") = false, py::arg("residual") = py::none(),
        py::arg("context") = py::none(), py::arg("num_threads") = 1, py::arg("portable") = false,
        "context float32 [batch, in, c] (None: c = 0) followed by x float32 [batch, in, length], convolved with\n"
        "weight float32 [out, in, kernel] (all C-contiguous, read in place) at `dilation`, with no padding: float32\n"
        "[batch, out, c + length - (kernel - 1) * dilation], + bias, + residual (that shape) where given; elu=True\n"
        "applies ELU (alpha 1) to the input first. Each\n"
        "output sums bias, residual, then the products in one fixed order with one rounding each, so the same bits\n"
        "on any thread count and in both forms (portable=True runs the scalar form where AVX-512 is present too).");
  m.def("causal_conv1d_fast", &avx512_present,
        "Whether causal_conv1d runs its AVX-512 form here (its portable form is far slower than torch's conv1d).");
}

}  // namespace vivace
