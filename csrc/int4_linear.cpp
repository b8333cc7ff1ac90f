#include "int4_linear.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <pybind11/stl.h>

#include "gelu.h"
#include "kernel_isas.h"
#include "numpy_args.h"
#include "row_blocks.h"
#include "thread_pool.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define VIVACE_X86 1
#endif

namespace vivace {
namespace {

// Layout of int4_pack, per block of 64 output channels and group of 64 inputs (kInt4GroupBytes, one sequential
// run of memory per block): 8 pairs of input steps x 256 bytes, then the 64 channels' scales as bfloat16. In a pair,
// 64-byte vector j holds channels 16j..16j+15, channel c's bytes at 4c..4c+3; the low nibble of byte i is input
// 8p + i (step 2p), the high nibble input 8p + 4 + i (step 2p + 1), stored as q + 8 in [0, 15]. One 64-byte load
// and two masks give 16 channels x 4 inputs twice over, the operand vpdpbusd sums 4 products per lane from.
constexpr int64_t kPairs = kInt4Group / 8;
constexpr int64_t kNibbleBytes = kInt4Block * kInt4Group / 2;

int64_t groups_of(int64_t in_features) { return (in_features + kInt4Group - 1) / kInt4Group; }
int64_t blocks_of(int64_t out_features) { return (out_features + kInt4Block - 1) / kInt4Block; }

uint16_t to_bfloat16(float value) {  // round to nearest, ties to even (as torch's .to(torch.bfloat16))
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if (std::isnan(value)) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fff + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

float from_bfloat16(uint16_t half) {
  const uint32_t bits = static_cast<uint32_t>(half) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// Byte offset, within a block's group, of the nibble of channel c (0-63) and input kk (0-63); high: whether it is the
// byte's high nibble.
inline int64_t nibble_byte(int64_t c, int64_t kk, bool& high) {
  high = (kk % 8) >= 4;
  return (kk / 8) * 256 + (c / 16) * 64 + (c % 16) * 4 + kk % 4;
}

void pack(const int8_t* q, const float* scales, int64_t out_features, int64_t in_features, uint8_t* packed) {
  const int64_t groups = groups_of(in_features), blocks = blocks_of(out_features);
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t g = 0; g < groups; ++g) {
      uint8_t* dst = packed + (b * groups + g) * kInt4GroupBytes;
      std::memset(dst, 0x88, kNibbleBytes);  // q = 0 past the last channel and input
      std::memset(dst + kNibbleBytes, 0, kInt4Block * 2);
      for (int64_t c = 0; c < kInt4Block && b * kInt4Block + c < out_features; ++c) {
        const int64_t n = b * kInt4Block + c;
        for (int64_t kk = 0; kk < kInt4Group && g * kInt4Group + kk < in_features; ++kk) {
          bool high = false;
          uint8_t& byte = dst[nibble_byte(c, kk, high)];
          const uint8_t u = static_cast<uint8_t>(q[n * in_features + g * kInt4Group + kk] + 8);
          byte = high ? static_cast<uint8_t>((byte & 0x0f) | (u << 4)) : static_cast<uint8_t>((byte & 0xf0) | u);
        }
        const uint16_t scale = to_bfloat16(scales[n * groups + g]);
        std::memcpy(dst + kNibbleBytes + 2 * c, &scale, sizeof scale);
      }
    }
  }
}

void unpack(const uint8_t* packed, int64_t out_features, int64_t in_features, int8_t* q, float* scales) {
  const int64_t groups = groups_of(in_features);
  for (int64_t n = 0; n < out_features; ++n) {
    const int64_t b = n / kInt4Block, c = n % kInt4Block;
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* src = packed + (b * groups + g) * kInt4GroupBytes;
      for (int64_t kk = 0; kk < kInt4Group && g * kInt4Group + kk < in_features; ++kk) {
        bool high = false;
        const uint8_t byte = src[nibble_byte(c, kk, high)];
        q[n * in_features + g * kInt4Group + kk] = static_cast<int8_t>((high ? byte >> 4 : byte & 0x0f) - 8);
      }
      uint16_t scale;
      std::memcpy(&scale, src + kNibbleBytes + 2 * c, sizeof scale);
      scales[n * groups + g] = from_bfloat16(scale);
    }
  }
}

// Rows of activations as int8 per group of 64 inputs: x ~ values * scale[g], and offset[g] = 8 * the group's sum of
// values, which takes the nibbles' +8 out of the int32 sums.
struct QuantizedGroups {
  int64_t groups;
  std::vector<int8_t> values;  // [rows, groups * 64], zeros past in_features
  std::vector<float> scale;  // [rows, groups]
  std::vector<int32_t> offset;  // [rows, groups]
};

// Every row and group of x through quantize_group(src, length, dst) -> (scale, sum of the values it wrote to dst).
template <class QuantizeGroup>
QuantizedGroups quantize_each_group(const float* x, int64_t rows, int64_t in, QuantizeGroup&& quantize_group) {
  const int64_t groups = groups_of(in), stride = groups * kInt4Group;
  QuantizedGroups q{groups, std::vector<int8_t>(rows * stride, 0), std::vector<float>(rows * groups),
                    std::vector<int32_t>(rows * groups)};
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k0 = g * kInt4Group;
      const auto [scale, sum] = quantize_group(x + r * in + k0, std::min(kInt4Group, in - k0), &q.values[r * stride + k0]);
      q.scale[r * groups + g] = scale;
      q.offset[r * groups + g] = 8 * sum;
    }
  }
  return q;
}

// The vector form's values without vector instructions: the largest magnitude is the same whatever the order, and
// std::nearbyint rounds to nearest even in the default mode, as vcvtps2dq does.
QuantizedGroups quantize_groups_portable(const float* x, int64_t rows, int64_t in) {
  return quantize_each_group(x, rows, in, [](const float* src, int64_t length, int8_t* dst) {
    float magnitude = 0.0f;
    for (int64_t k = 0; k < length; ++k) magnitude = std::max(magnitude, std::fabs(src[k]));
    const float scale = magnitude > 0.0f ? magnitude / 127.0f : 1.0f;
    const float inverse = 1.0f / scale;
    int32_t sum = 0;
    for (int64_t k = 0; k < length; ++k) {
      const int32_t value = std::clamp(static_cast<int32_t>(std::nearbyint(src[k] * inverse)), -127, 127);
      dst[k] = static_cast<int8_t>(value);
      sum += value;
    }
    return std::pair{scale, sum};
  });
}

#ifdef VIVACE_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")
namespace avx512_vnni {

// x * (1 / scale) rounds to nearest even (the default MXCSR mode), as torch.round; an all-zero group has scale 1.
// A group's 64 bytes are all written, zeros past in_features.
QuantizedGroups quantize_groups(const float* x, int64_t rows, int64_t in) {
  return quantize_each_group(x, rows, in, [](const float* src, int64_t length, int8_t* dst) {
    __m512 v[4];
    __m512 largest = _mm512_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      const int64_t left = length - 16 * i;
      const __mmask16 mask = left >= 16 ? __mmask16(0xffff) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
      v[i] = _mm512_maskz_loadu_ps(mask, src + 16 * i);
      largest = _mm512_max_ps(largest, _mm512_abs_ps(v[i]));
    }
    const float magnitude = _mm512_reduce_max_ps(largest);
    const float scale = magnitude > 0.0f ? magnitude / 127.0f : 1.0f;
    const __m512 inverse = _mm512_set1_ps(1.0f / scale);
    const __m512i low = _mm512_set1_epi32(-127), high = _mm512_set1_epi32(127);
    __m512i sum = _mm512_setzero_si512();
    for (int i = 0; i < 4; ++i) {
      __m512i value = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], inverse));
      value = _mm512_min_epi32(_mm512_max_epi32(value, low), high);
      sum = _mm512_add_epi32(sum, value);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16 * i), _mm512_cvtepi32_epi8(value));
    }
    return std::pair{scale, _mm512_reduce_add_epi32(sum)};
  });
}

inline __m512i broadcast4(const int8_t* x) {
  int32_t four;
  std::memcpy(&four, x, sizeof four);
  return _mm512_set1_epi32(four);
}

// 16 bfloat16 scales -> float32.
inline __m512 load_scales(const uint8_t* at) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// How far ahead of its loads the kernel asks for a block's weights (into L2), as the int8 VNNI kernel does.
constexpr int64_t kPrefetchBytes = 4096;

// kRows (1-4) activation rows against the 64 channels of one block: 16 int32 sums per group at most (named: GCC
// keeps an array of them on the stack), folded into float32 accumulators at each group's end.
template <int kRows>
void block(const Int4Linear& p, const QuantizedGroups& q, int64_t b, int64_t r0) {
  const int64_t groups = q.groups, stride = groups * kInt4Group;
  const uint8_t* w = p.packed + b * groups * kInt4GroupBytes;
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  __m512 f[kRows][4];
  for (auto& row : f)
    for (auto& lane : row) lane = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g, w += kInt4GroupBytes) {
    const __m512i zero = _mm512_setzero_si512();
    __m512i a00 = zero, a01 = zero, a02 = zero, a03 = zero, a10 = zero, a11 = zero, a12 = zero, a13 = zero;
    __m512i a20 = zero, a21 = zero, a22 = zero, a23 = zero, a30 = zero, a31 = zero, a32 = zero, a33 = zero;
    const int8_t* x = q.values.data() + r0 * stride + g * kInt4Group;
    for (int64_t pair = 0; pair < kPairs; ++pair) {
      const uint8_t* wp = w + pair * 256;
      for (int line = 0; line < 4; ++line) _mm_prefetch(reinterpret_cast<const char*>(wp) + kPrefetchBytes + 64 * line, _MM_HINT_T2);
      const __m512i v0 = _mm512_loadu_si512(wp), v1 = _mm512_loadu_si512(wp + 64);
      const __m512i v2 = _mm512_loadu_si512(wp + 128), v3 = _mm512_loadu_si512(wp + 192);
      for (int half = 0; half < 2; ++half) {
        const __m512i w0 = half ? _mm512_and_si512(_mm512_srli_epi16(v0, 4), nibble) : _mm512_and_si512(v0, nibble);
        const __m512i w1 = half ? _mm512_and_si512(_mm512_srli_epi16(v1, 4), nibble) : _mm512_and_si512(v1, nibble);
        const __m512i w2 = half ? _mm512_and_si512(_mm512_srli_epi16(v2, 4), nibble) : _mm512_and_si512(v2, nibble);
        const __m512i w3 = half ? _mm512_and_si512(_mm512_srli_epi16(v3, 4), nibble) : _mm512_and_si512(v3, nibble);
        const int64_t k = pair * 8 + half * 4;
#define VIVACE_ROW(r)                                              \
  if constexpr (kRows > r) {                                       \
    const __m512i xb = broadcast4(x + r * stride + k);             \
    a##r##0 = _mm512_dpbusd_epi32(a##r##0, w0, xb);                \
    a##r##1 = _mm512_dpbusd_epi32(a##r##1, w1, xb);                \
    a##r##2 = _mm512_dpbusd_epi32(a##r##2, w2, xb);                \
    a##r##3 = _mm512_dpbusd_epi32(a##r##3, w3, xb);                \
  }
        VIVACE_ROW(0) VIVACE_ROW(1) VIVACE_ROW(2) VIVACE_ROW(3)
#undef VIVACE_ROW
      }
    }
    const __m512 s0 = load_scales(w + kNibbleBytes), s1 = load_scales(w + kNibbleBytes + 32);
    const __m512 s2 = load_scales(w + kNibbleBytes + 64), s3 = load_scales(w + kNibbleBytes + 96);
#define VIVACE_FOLD(r)                                                                                    \
  if constexpr (kRows > r) {                                                                              \
    const int64_t at = (r0 + r) * groups + g;                                                             \
    const __m512i offset = _mm512_set1_epi32(q.offset[at]);                                               \
    const __m512 x_scale = _mm512_set1_ps(q.scale[at]);                                                   \
    f[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a##r##0, offset)), _mm512_mul_ps(s0, x_scale), f[r][0]); \
    f[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a##r##1, offset)), _mm512_mul_ps(s1, x_scale), f[r][1]); \
    f[r][2] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a##r##2, offset)), _mm512_mul_ps(s2, x_scale), f[r][2]); \
    f[r][3] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a##r##3, offset)), _mm512_mul_ps(s3, x_scale), f[r][3]); \
  }
    VIVACE_FOLD(0) VIVACE_FOLD(1) VIVACE_FOLD(2) VIVACE_FOLD(3)
#undef VIVACE_FOLD
  }
  const int64_t n0 = b * kInt4Block;
  for (int r = 0; r < kRows; ++r) {
    for (int j = 0; j < 4 && n0 + 16 * j < p.out_features; ++j) {
      const int64_t n = n0 + 16 * j, valid = std::min<int64_t>(16, p.out_features - n);
      const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1);
      __m512 value = f[r][j];
      if (p.bias) value = _mm512_add_ps(value, _mm512_maskz_loadu_ps(mask, p.bias + n));
      _mm512_mask_storeu_ps(p.out + (r0 + r) * p.out_features + n, mask, value);
    }
  }
}

void run(const Int4Linear& p, int threads) {
  const QuantizedGroups q = quantize_groups(p.x, p.rows, p.in_features);
  parallel_for(blocks_of(p.out_features), threads, [&](int64_t b) {
    for_row_blocks_of_4(p.rows, [&](auto rows, int64_t r) { block<decltype(rows)::value>(p, q, b, r); });
  });
}

}  // namespace avx512_vnni
#pragma GCC pop_options
#endif

#ifdef VIVACE_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {

// The VNNI kernel's arithmetic on AVX2: vpmaddubsw multiplies the unsigned nibbles by the int8 activations into
// int16 pairs, exact here (|15 * 127 * 2| < 2**15, where int8 x int8 would saturate), and vpmaddwd by ones sums
// them into int32 lanes of 4 products: vpdpbusd's sums. The groups fold into float32 with the same fused
// multiply-adds in the same order, so the outputs are the VNNI kernel's bits. Sixteen ymm registers hold two rows
// against 32 channels: a block runs as two halves of 32 channels, reading 128 of each pair's 256 bytes.

inline __m256i broadcast4(const int8_t* x) {
  int32_t four;
  std::memcpy(&four, x, sizeof four);
  return _mm256_set1_epi32(four);
}

inline __m256 load_scales(const uint8_t* at) {  // 8 bfloat16 -> float32
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(at));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

// kRows (1-2) rows r0.. against channels 32 * half .. + 32 of block b, into f[row][channel of the block].
template <int kRows>
void half_block(const Int4Linear& p, const QuantizedGroups& q, int64_t b, int64_t half, int64_t r0, float (*f)[kInt4Block]) {
  const int64_t groups = q.groups, stride = groups * kInt4Group;
  const __m256i nibble = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  const uint8_t* w = p.packed + b * groups * kInt4GroupBytes;
  for (int64_t g = 0; g < groups; ++g, w += kInt4GroupBytes) {
    __m256i acc[kRows][4];
    for (auto& row : acc)
      for (auto& lane : row) lane = _mm256_setzero_si256();
    const int8_t* x = q.values.data() + r0 * stride + g * kInt4Group;
    for (int64_t pair = 0; pair < kPairs; ++pair) {
      const uint8_t* wp = w + pair * 256 + half * 128;
      for (int v = 0; v < 4; ++v) {
        const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 32 * v));
        const __m256i low = _mm256_and_si256(bytes, nibble), high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);
        for (int r = 0; r < kRows; ++r) {
          const __m256i lo = _mm256_madd_epi16(_mm256_maddubs_epi16(low, broadcast4(x + r * stride + pair * 8)), ones);
          const __m256i hi = _mm256_madd_epi16(_mm256_maddubs_epi16(high, broadcast4(x + r * stride + pair * 8 + 4)), ones);
          acc[r][v] = _mm256_add_epi32(acc[r][v], _mm256_add_epi32(lo, hi));
        }
      }
    }
    for (int r = 0; r < kRows; ++r) {
      const int64_t at = (r0 + r) * groups + g;
      const __m256i offset = _mm256_set1_epi32(q.offset[at]);
      const __m256 x_scale = _mm256_set1_ps(q.scale[at]);
      for (int v = 0; v < 4; ++v) {
        float* lanes = f[r] + half * 32 + 8 * v;
        const __m256 scale = _mm256_mul_ps(load_scales(w + kNibbleBytes + 2 * (half * 32 + 8 * v)), x_scale);
        const __m256 sum = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r][v], offset));
        _mm256_storeu_ps(lanes, _mm256_fmadd_ps(sum, scale, _mm256_loadu_ps(lanes)));
      }
    }
  }
}

template <int kRows>
void block(const Int4Linear& p, const QuantizedGroups& q, int64_t b, int64_t r0) {
  float f[kRows][kInt4Block] = {};
  half_block<kRows>(p, q, b, 0, r0, f);
  half_block<kRows>(p, q, b, 1, r0, f);
  const int64_t n0 = b * kInt4Block, valid = std::min(kInt4Block, p.out_features - n0);
  for (int r = 0; r < kRows; ++r)
    for (int64_t c = 0; c < valid; ++c)
      p.out[(r0 + r) * p.out_features + n0 + c] = p.bias ? f[r][c] + p.bias[n0 + c] : f[r][c];
}

void run(const Int4Linear& p, int threads) {
  const QuantizedGroups q = quantize_groups_portable(p.x, p.rows, p.in_features);
  parallel_for(blocks_of(p.out_features), threads, [&](int64_t b) {
    int64_t r = 0;
    for (; r + 2 <= p.rows; r += 2) block<2>(p, q, b, r);
    if (r < p.rows) block<1>(p, q, b, r);
  });
}

}  // namespace avx2
#pragma GCC pop_options
#endif

using Isa = KernelIsa<Int4Linear>;

const std::vector<Isa>& supported() {
  static const std::vector<Isa> isas = [] {
    std::vector<Isa> found;
#ifdef VIVACE_X86
    if (cpu_has_avx512_vnni()) found.push_back({"avx512_vnni", &avx512_vnni::run});
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) found.push_back({"avx2", &avx2::run});
#endif
    return found;
  }();
  return isas;
}

const Isa& find(const std::string& name) {
  return find_isa(supported(), name, "int4_linear", "AVX-512 VNNI or AVX2");
}

py::array_t<float> linear(py::handle x_object, py::handle packed_object, int64_t out_features, py::object bias_object,
                          int num_threads, const std::string& activation, const std::string& isa) {
  if (num_threads < 1) throw py::value_error("num_threads must be >= 1");
  if (activation != "none" && activation != "gelu")
    throw py::value_error("activation must be 'none' or 'gelu', got '" + activation + "'");
  const Isa& chosen = find(isa);  // before any work: an unknown or missing isa is the caller's error
  const auto x = typed_array<float>(x_object, "x", "float32", 2, true);
  const auto packed = typed_array<uint8_t>(packed_object, "packed", "uint8", 3, false);
  const int64_t rows = x.shape(0), in = x.shape(1);
  check_int4_packed(packed, out_features, in, "packed");
  const auto bias = optional_bias(bias_object, out_features);
  py::array_t<float> out({rows, out_features});
  const Int4Linear problem{x.data(), packed.data(), bias_object.is_none() ? nullptr : bias.data(), out.mutable_data(),
                           rows, in, out_features};
  {
    py::gil_scoped_release release;
    chosen.run(problem, num_threads);
    if (activation == "gelu") gelu_inplace(problem.out, rows * out_features);
  }
  return out;
}

py::array_t<uint8_t> pack_array(py::handle q_object, py::handle scales_object) {
  const auto q = typed_array<int8_t>(q_object, "q", "int8", 2, true);
  const auto scales = typed_array<float>(scales_object, "scales", "float32", 2, true);
  const int64_t out_features = q.shape(0), in = q.shape(1);
  if (scales.shape(0) != out_features || scales.shape(1) != groups_of(in))
    throw py::value_error("scales " + shape_of(scales) + " must be (" + std::to_string(out_features) + ", " +
                          std::to_string(groups_of(in)) + "): one per weight row and group of 64 inputs");
  const int8_t* values = q.data();
  for (int64_t i = 0; i < out_features * in; ++i)
    if (values[i] < -8 || values[i] > 7) throw py::value_error("q must hold values in [-8, 7], got " + std::to_string(values[i]));
  py::array_t<uint8_t> packed({blocks_of(out_features), groups_of(in), kInt4GroupBytes});
  pack(values, scales.data(), out_features, in, packed.mutable_data());
  return packed;
}

py::tuple unpack_array(py::handle packed_object, int64_t out_features, int64_t in_features) {
  const auto packed = typed_array<uint8_t>(packed_object, "packed", "uint8", 3, true);
  check_int4_packed(packed, out_features, in_features, "packed");
  py::array_t<int8_t> q({out_features, in_features});
  py::array_t<float> scales({out_features, groups_of(in_features)});
  unpack(packed.data(), out_features, in_features, q.mutable_data(), scales.mutable_data());
  return py::make_tuple(q, scales);
}

}  // namespace

void check_int4_packed(const py::array& packed, int64_t out_features, int64_t in_features, const std::string& name) {
  if (out_features < 1 || in_features < 1) throw py::value_error(name + ": out_features and in_features must be >= 1");
  if (packed.ndim() != 3 || packed.shape(0) != blocks_of(out_features) || packed.shape(1) != groups_of(in_features) ||
      packed.shape(2) != kInt4GroupBytes)
    throw py::value_error(name + " " + shape_of(packed) + " must be int4_pack of a [" + std::to_string(out_features) +
                          ", " + std::to_string(in_features) + "] weight, shape (" +
                          std::to_string(blocks_of(out_features)) + ", " + std::to_string(groups_of(in_features)) +
                          ", " + std::to_string(kInt4GroupBytes) + ")");
}

std::vector<std::string> int4_linear_isas() { return isa_names(supported()); }

void int4_linear(const Int4Linear& problem, int threads, const std::string& isa) {
  find(isa).run(problem, std::max(1, threads));
}

void register_int4_linear(py::module_& m) {
  m.def("int4_linear", &linear, py::arg("x"), py::arg("packed"), py::arg("out_features"), py::arg("bias") = py::none(),
        py::arg("num_threads") = 1, py::arg("activation") = "none", py::arg("isa") = "auto",
        "A linear layer with 4-bit group-wise weights (int4_pack): x float32 [rows, in] is quantized per row and\n"
        "group of 64 inputs to symmetric int8, each group's products with the weights summed exactly in int32 and\n"
        "scaled by the group's weight and activation scales, the groups added in order (+ bias). activation 'gelu'\n"
        "applies torch's exact GELU to the outputs. isa: 'auto' (the fastest) or one of int4_linear_isas(); every\n"
        "one gives the same bits. Returns float32 [rows, out_features].");
  m.def("int4_pack", &pack_array, py::arg("q"), py::arg("scales"),
        "q int8 [out, in] in [-8, 7] and scales float32 [out, ceil(in / 64)] (rounded to bfloat16) -> uint8\n"
        "[ceil(out / 64), ceil(in / 64), 2176]: per block of 64 channels and group of 64 inputs, the nibbles q + 8\n"
        "as int4_linear reads them, then the 64 scales.");
  m.def("int4_unpack", &unpack_array, py::arg("packed"), py::arg("out_features"), py::arg("in_features"),
        "int4_pack's inverse: (q int8 [out, in], scales float32 [out, ceil(in / 64)], the bfloat16 values).");
  m.def("int4_linear_isas", &int4_linear_isas, "The instruction sets int4_linear runs on this CPU, best first.");
}

}  // namespace vivace
