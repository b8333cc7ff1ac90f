#include "int8_linear.h"

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
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define VIVACE_X86 1
#endif

namespace vivace {
namespace {

// Output channels per work item: 64 channels of int8 weights (64-256 KB at 1024-4096 inputs), enough that a wake-up
// is cheap beside it and few enough that a late thread finds items left. The VNNI kernel's packed groups are this
// size.
constexpr int64_t kItemChannels = 64;

// Rows of activations as uint8 with a scale and zero point each: x ~ (xq - zero) * scale.
struct QuantizedRows {
  int64_t stride;  // in_features rounded up to 4 (zeros past it): the kernel broadcasts 4 bytes at a time
  std::vector<uint8_t> values;  // [rows, stride]
  std::vector<float> scale;
  std::vector<int32_t> zero;
};

// out[r, n] from the exact int32 sum of row r's quantized activations with weight row n (every instruction set).
inline void store(const Int8Linear& p, float row_scale, int32_t row_zero, int64_t r, int64_t n, int32_t sum) {
  const float value = static_cast<float>(sum - row_zero * p.weight_sums[n]) * (row_scale * p.scales[n]);
  p.out[r * p.out_features + n] = p.bias ? value + p.bias[n] : value;
}

// weight int8 [out, in] -> [ceil(out / 64), ceil(in / 4), 64, 4] at packed, zeros past out and in (see
// avx512_vnni::packed_block).
void pack_for_vnni(const int8_t* weight, int64_t out_features, int64_t in, int8_t* packed) {
  const int64_t steps = (in + 3) / 4;
  std::memset(packed, 0, (out_features + 63) / 64 * steps * 256);
  for (int64_t n = 0; n < out_features; ++n)
    for (int64_t k = 0; k < in; ++k) packed[((n / 64 * steps + k / 4) * 64 + n % 64) * 4 + k % 4] = weight[n * in + k];
}

// p with packed weights: the caller's, or packed into `storage` for this call where it kept none.
Int8Linear with_packed_weights(const Int8Linear& p, std::vector<int8_t>& storage) {
  Int8Linear packed = p;
  if (!packed.vnni_weight) {
    storage.resize((p.out_features + 63) / 64 * ((p.in_features + 3) / 4) * 256);
    pack_for_vnni(p.weight, p.out_features, p.in_features, storage.data());
    packed.vnni_weight = storage.data();
  }
  return packed;
}

#ifdef VIVACE_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")
namespace avx512_vnni {

// Row by row, into rows of `stride` bytes (in_features rounded up to 4, zeros past it): the range always holds 0, so a zero activation (padding, ReLU) is exact; x * (1 / scale) rounds to
// nearest even (the default MXCSR mode), as torch.round.
QuantizedRows quantize_rows(const float* x, int64_t rows, int64_t in) {
  const int64_t stride = (in + 3) / 4 * 4;
  QuantizedRows q{stride, std::vector<uint8_t>(rows * stride, 0), std::vector<float>(rows), std::vector<int32_t>(rows)};
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
    uint8_t* out = q.values.data() + r * stride;
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

// Weights as int8_vnni_pack lays them out: per group of 64 channels and step of 4 inputs, 256 contiguous bytes,
// channel c's 4 weights at 4 * c. One 64-byte load holds 16 channels x 4 inputs, and vpdpbusd against 4 activation
// bytes broadcast to every lane adds their products into 16 channels' sums at once: no horizontal sums, and a
// group's weights stream from one sequential run of memory.

// out[r, n0..n0+16) from the int32 sums of 16 channels: store's float32 ops, lane by lane (the same bits).
inline void store16(const Int8Linear& p, const QuantizedRows& q, int64_t r, int64_t n0, __m512i sums) {
  const int64_t valid = std::min<int64_t>(16, p.out_features - n0);
  const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1);
  const __m512i centered =
      _mm512_sub_epi32(sums, _mm512_mullo_epi32(_mm512_set1_epi32(q.zero[r]), _mm512_maskz_loadu_epi32(mask, p.weight_sums + n0)));
  const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(q.scale[r]), _mm512_maskz_loadu_ps(mask, p.scales + n0));
  __m512 value = _mm512_mul_ps(_mm512_cvtepi32_ps(centered), scale);
  if (p.bias) value = _mm512_add_ps(value, _mm512_maskz_loadu_ps(mask, p.bias + n0));
  _mm512_mask_storeu_ps(p.out + r * p.out_features + n0, mask, value);
}

inline __m512i broadcast4(const uint8_t* x) {
  int32_t four;
  std::memcpy(&four, x, sizeof four);
  return _mm512_set1_epi32(four);
}

// How far ahead of its loads the VNNI kernel asks for a group's weights (into L2): one sequential stream per thread
// leaves the hardware prefetcher short of DRAM's rate (docs/performance.md, "The native decoder stack").
constexpr int64_t kPrefetchBytes = 4096;

// kRows (1-4) activation rows against the 64 channels of one group: sixteen accumulators at most, named (GCC keeps
// an array of them on the stack).
template <int kRows>
void packed_block(const Int8Linear& p, const QuantizedRows& q, int64_t group, int64_t r0) {
  const int64_t steps = q.stride / 4;
  const int8_t* w = p.vnni_weight + group * steps * 256;
  const uint8_t* x = q.values.data() + r0 * q.stride;
  const __m512i zero = _mm512_setzero_si512();
  __m512i a00 = zero, a01 = zero, a02 = zero, a03 = zero, a10 = zero, a11 = zero, a12 = zero, a13 = zero;
  __m512i a20 = zero, a21 = zero, a22 = zero, a23 = zero, a30 = zero, a31 = zero, a32 = zero, a33 = zero;
  for (int64_t s = 0; s < steps; ++s, w += 256) {
    const char* ahead = reinterpret_cast<const char*>(w) + kPrefetchBytes;
    for (int line = 0; line < 4; ++line) _mm_prefetch(ahead + 64 * line, _MM_HINT_T2);
    const __m512i w0 = _mm512_loadu_si512(w), w1 = _mm512_loadu_si512(w + 64);
    const __m512i w2 = _mm512_loadu_si512(w + 128), w3 = _mm512_loadu_si512(w + 192);
#define VIVACE_ROW(r)                                                       \
  if constexpr (kRows > r) {                                                \
    const __m512i xb = broadcast4(x + r * q.stride + 4 * s);                \
    a##r##0 = _mm512_dpbusd_epi32(a##r##0, xb, w0);                         \
    a##r##1 = _mm512_dpbusd_epi32(a##r##1, xb, w1);                         \
    a##r##2 = _mm512_dpbusd_epi32(a##r##2, xb, w2);                         \
    a##r##3 = _mm512_dpbusd_epi32(a##r##3, xb, w3);                         \
  }
    VIVACE_ROW(0) VIVACE_ROW(1) VIVACE_ROW(2) VIVACE_ROW(3)
#undef VIVACE_ROW
  }
  const int64_t n0 = group * 64;
#define VIVACE_STORE(r)                                                                          \
  if constexpr (kRows > r) {                                                                     \
    store16(p, q, r0 + r, n0, a##r##0);                                                          \
    if (n0 + 16 < p.out_features) store16(p, q, r0 + r, n0 + 16, a##r##1);                      \
    if (n0 + 32 < p.out_features) store16(p, q, r0 + r, n0 + 32, a##r##2);                      \
    if (n0 + 48 < p.out_features) store16(p, q, r0 + r, n0 + 48, a##r##3);                      \
  }
  VIVACE_STORE(0) VIVACE_STORE(1) VIVACE_STORE(2) VIVACE_STORE(3)
#undef VIVACE_STORE
}

void run(const Int8Linear& unpacked, int threads) {
  std::vector<int8_t> storage;
  const Int8Linear p = with_packed_weights(unpacked, storage);
  const QuantizedRows q = quantize_rows(p.x, p.rows, p.in_features);
  parallel_for((p.out_features + kItemChannels - 1) / kItemChannels, threads, [&](int64_t group) {
    for_row_blocks_of_4(p.rows, [&](auto rows, int64_t r) { packed_block<decltype(rows)::value>(p, q, group, r); });
  });
}

}  // namespace avx512_vnni
#pragma GCC pop_options
#endif

#ifdef VIVACE_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8")
namespace amx_int8 {

// AMX tiles on the VNNI kernel's packed weights and quantized rows: a B tile is 16 steps of 4 inputs x 16 channels,
// which the packed layout holds as 16 rows of 64 bytes 256 bytes apart, so tileloadd reads the weights in place.
// tdpbusd adds uint8 x int8 products into exact int32 sums like vpdpbusd, so the outputs are the same bits; the
// steps past the last whole 16 (inputs past the last 64) are added by vpdpbusd before the store.
// Tiles: tmm0-3 the sums of one group's 4 x 16 channels, tmm4 the activations, tmm5-6 weights.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

void configure(int64_t rows) {
  TileConfig config;
  for (int tile = 0; tile < 7; ++tile) {
    config.bytes_per_row[tile] = 64;
    config.rows[tile] = tile < 5 ? static_cast<uint8_t>(rows) : 16;
  }
  _tile_loadconfig(&config);
}

// Rows r0..r0 + rows (at most 16, the tiles as configured) against the 64 channels of one group.
void block(const Int8Linear& p, const QuantizedRows& q, int64_t group, int64_t r0, int64_t rows) {
  const int64_t steps = q.stride / 4, whole = steps / 16 * 16;
  const int8_t* w = p.vnni_weight + group * steps * 256;
  const uint8_t* x = q.values.data() + r0 * q.stride;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t s = 0; s < whole; s += 16) {
    const int8_t* ws = w + s * 256;
    _tile_loadd(4, x + 4 * s, q.stride);
    _tile_loadd(5, ws, 256);
    _tile_loadd(6, ws + 64, 256);
    _tile_dpbusd(0, 4, 5);
    _tile_dpbusd(1, 4, 6);
    _tile_loadd(5, ws + 128, 256);
    _tile_loadd(6, ws + 192, 256);
    _tile_dpbusd(2, 4, 5);
    _tile_dpbusd(3, 4, 6);
  }
  alignas(64) int32_t sums[16][64];
  _tile_stored(0, &sums[0][0], sizeof sums[0]);
  _tile_stored(1, &sums[0][16], sizeof sums[0]);
  _tile_stored(2, &sums[0][32], sizeof sums[0]);
  _tile_stored(3, &sums[0][48], sizeof sums[0]);
  const int64_t n0 = group * 64;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < 4 && n0 + 16 * j < p.out_features; ++j) {
      __m512i sum = _mm512_load_si512(&sums[r][16 * j]);
      for (int64_t s = whole; s < steps; ++s)
        sum = _mm512_dpbusd_epi32(sum, avx512_vnni::broadcast4(x + r * q.stride + 4 * s),
                                  _mm512_loadu_si512(w + s * 256 + 64 * j));
      avx512_vnni::store16(p, q, r0 + r, n0 + 16 * j, sum);
    }
  }
}

void run(const Int8Linear& unpacked, int threads) {
  std::vector<int8_t> storage;
  const Int8Linear p = with_packed_weights(unpacked, storage);
  const QuantizedRows q = avx512_vnni::quantize_rows(p.x, p.rows, p.in_features);
  parallel_for((p.out_features + kItemChannels - 1) / kItemChannels, threads, [&](int64_t group) {
    int64_t configured = 0;  // tile configuration is per thread, and its rows change only at the last block
    for (int64_t r = 0; r < p.rows; r += 16) {
      const int64_t rows = std::min<int64_t>(16, p.rows - r);
      if (rows != configured) configure(configured = rows);
      block(p, q, group, r, rows);
    }
    _tile_release();
  });
}

// The CPU has AMX-TILE and AMX-INT8 (CPUID leaf 7) and Linux lets this process use the tile data state (which
// it asks for once; kernels before 5.16 have no such request and do not allow it).
bool usable() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  if (!(edx & (1u << 24)) || !(edx & (1u << 25))) return false;
  constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
  return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
}

}  // namespace amx_int8
#pragma GCC pop_options
#endif

#ifdef VIVACE_X86
#pragma GCC push_options
#pragma GCC target("avx2")
namespace avx2 {

// AVX2 has no int8 dot product that is exact for uint8 x int8 (vpmaddubsw saturates at 16 bits), so activations are
// widened to int16 once per row and weights sixteen at a time, and vpmaddwd sums pairs into int32: the same exact
// sums as the VNNI kernel, so both give the same bits. Activation rows are padded with zeros to whole 16s; a weight
// row's tail past its last 16 is summed in scalar code.
struct WideRows {
  int64_t stride;  // in_features rounded up to 16
  std::vector<int16_t> values;  // [rows, stride], zeros past in_features
  std::vector<float> scale;
  std::vector<int32_t> zero;
};

// The VNNI kernel's quantization, value for value: the range holds 0 (its accumulators start at 0 and masked
// lanes read 0), and x * (1 / scale) converts to the nearest integer, ties to even.
WideRows quantize_rows(const float* x, int64_t rows, int64_t in) {
  const int64_t stride = (in + 15) / 16 * 16;
  WideRows q{stride, std::vector<int16_t>(rows * stride, 0), std::vector<float>(rows), std::vector<int32_t>(rows)};
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * in;
    float lowest = 0.0f, highest = 0.0f;
    for (int64_t k = 0; k < in; ++k) {
      lowest = std::min(lowest, row[k]);
      highest = std::max(highest, row[k]);
    }
    const float scale = highest > lowest ? (highest - lowest) / 255.0f : 1.0f;
    const int32_t zero = static_cast<int32_t>(std::clamp(std::nearbyint(-lowest / scale), 0.0f, 255.0f));
    const float inverse = 1.0f / scale;
    int16_t* out = q.values.data() + r * stride;
    for (int64_t k = 0; k < in; ++k)
      out[k] = static_cast<int16_t>(std::clamp(static_cast<int32_t>(std::nearbyint(row[k] * inverse)) + zero, 0, 255));
    q.scale[r] = scale;
    q.zero[r] = zero;
  }
  return q;
}

inline int32_t sum_lanes(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Four weight rows against kRows (1 or 2) activation rows: eight accumulators, the most sixteen ymm registers hold
// beside the loads.
template <int kRows>
void block(const Int8Linear& p, const WideRows& q, int64_t n0, int64_t r0) {
  const int64_t in = p.in_features, whole = in / 16 * 16;
  const int8_t* w = p.weight + n0 * in;
  const int16_t* x0 = q.values.data() + r0 * q.stride;
  const int16_t* x1 = x0 + q.stride;
  __m256i acc[4][kRows];
  for (auto& channel : acc)
    for (auto& a : channel) a = _mm256_setzero_si256();
  const int8_t* next = w + 4 * in;  // the next block's four rows, 256 bytes prefetched per 64 inputs (as VNNI's)
  for (int64_t k = 0; k < whole; k += 16) {
    if (k % 64 == 0) {
      for (int line = 0; line < 4; ++line) _mm_prefetch(reinterpret_cast<const char*>(next + line * 64), _MM_HINT_T0);
      next += 256;
    }
    const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x0 + k));
    const __m256i a1 = kRows > 1 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x1 + k)) : a0;
    for (int c = 0; c < 4; ++c) {
      const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c * in + k)));
      acc[c][0] = _mm256_add_epi32(acc[c][0], _mm256_madd_epi16(a0, wv));
      if constexpr (kRows > 1) acc[c][kRows - 1] = _mm256_add_epi32(acc[c][kRows - 1], _mm256_madd_epi16(a1, wv));
    }
  }
  for (int c = 0; c < 4; ++c) {
    const int64_t n = n0 + c;
    for (int r = 0; r < kRows; ++r) {
      const int16_t* xr = r ? x1 : x0;
      int32_t sum = sum_lanes(acc[c][r]);
      for (int64_t k = whole; k < in; ++k) sum += xr[k] * w[c * in + k];
      store(p, q.scale[r0 + r], q.zero[r0 + r], r0 + r, n, sum);
    }
  }
}

// One weight row against every activation row (the channels past the last block of four).
void single_channel(const Int8Linear& p, const WideRows& q, int64_t n) {
  const int64_t in = p.in_features, whole = in / 16 * 16;
  const int8_t* w = p.weight + n * in;
  for (int64_t r = 0; r < p.rows; ++r) {
    const int16_t* xr = q.values.data() + r * q.stride;
    __m256i acc = _mm256_setzero_si256();
    for (int64_t k = 0; k < whole; k += 16)
      acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + k)),
                                                    _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k)))));
    int32_t sum = sum_lanes(acc);
    for (int64_t k = whole; k < in; ++k) sum += xr[k] * w[k];
    store(p, q.scale[r], q.zero[r], r, n, sum);
  }
}

// Channels n..n+3 against every row, two rows at a time.
void four_channels(const Int8Linear& p, const WideRows& q, int64_t n) {
  int64_t r = 0;
  for (; r + 2 <= p.rows; r += 2) block<2>(p, q, n, r);
  if (r < p.rows) block<1>(p, q, n, r);
}

// Every output channel, kItemChannels to a work item: blocks of four channels, then the channels past the last four.
void run(const Int8Linear& p, int threads) {
  const WideRows rows = quantize_rows(p.x, p.rows, p.in_features);
  parallel_for((p.out_features + kItemChannels - 1) / kItemChannels, threads, [&](int64_t item) {
    const int64_t end = std::min(p.out_features, (item + 1) * kItemChannels);
    int64_t n = item * kItemChannels;
    for (; n + 4 <= end; n += 4) four_channels(p, rows, n);
    for (; n < end; ++n) single_channel(p, rows, n);
  });
}

}  // namespace avx2
#pragma GCC pop_options
#endif

using Isa = KernelIsa<Int8Linear>;

const std::vector<Isa>& supported() {
  static const std::vector<Isa> isas = [] {
    std::vector<Isa> found;
#ifdef VIVACE_X86
    const bool vnni = cpu_has_avx512_vnni();
    if (vnni && amx_int8::usable()) found.push_back({"amx_int8", &amx_int8::run});
    if (vnni) found.push_back({"avx512_vnni", &avx512_vnni::run});
    if (__builtin_cpu_supports("avx2")) found.push_back({"avx2", &avx2::run});
#endif
    return found;
  }();
  return isas;
}

const Isa& find(const std::string& name) {
  return find_isa(supported(), name, "int8_linear", "AVX-512 VNNI or AVX2");
}

py::array_t<float> linear(py::handle x_object, py::handle weight_object, py::handle scales_object,
                          py::handle weight_sums_object, py::object bias_object, int num_threads, const std::string& isa,
                          py::object vnni_weight_object, const std::string& activation) {
  if (num_threads < 1) throw py::value_error("num_threads must be >= 1");
  if (activation != "none" && activation != "gelu")
    throw py::value_error("activation must be 'none' or 'gelu', got '" + activation + "'");
  const Isa& chosen = find(isa);  // before any work: an unknown or missing isa is the caller's error
  const auto x = typed_array<float>(x_object, "x", "float32", 2, true);
  const auto weight = typed_array<int8_t>(weight_object, "weight", "int8", 2, false);
  const auto scales = typed_array<float>(scales_object, "scales", "float32", 1, true);
  const auto weight_sums = typed_array<int32_t>(weight_sums_object, "weight_sums", "int32", 1, true);
  const int64_t rows = x.shape(0), in = x.shape(1), out_features = weight.shape(0);
  check_weight_columns(weight, x);
  check_per_channel(scales, "scales", out_features);
  check_per_channel(weight_sums, "weight_sums", out_features);
  const auto bias = optional_bias(bias_object, out_features);
  py::array_t<int8_t, py::array::c_style> vnni_weight;
  if (!vnni_weight_object.is_none()) {
    if (std::string(chosen.name) != "avx512_vnni" && std::string(chosen.name) != "amx_int8")
      throw py::value_error("vnni_weight is read by the avx512_vnni and amx_int8 kernels; isa '" + isa + "' runs " +
                            chosen.name);
    vnni_weight = typed_array<int8_t>(vnni_weight_object, "vnni_weight", "int8", 4, false);
    const int64_t groups = (out_features + 63) / 64, steps = (in + 3) / 4;
    if (vnni_weight.shape(0) != groups || vnni_weight.shape(1) != steps || vnni_weight.shape(2) != 64 ||
        vnni_weight.shape(3) != 4)
      throw py::value_error("vnni_weight " + shape_of(vnni_weight) + " must be int8_vnni_pack(weight), shape (" +
                            std::to_string(groups) + ", " + std::to_string(steps) + ", 64, 4)");
  }
  py::array_t<float> out({rows, out_features});
  const Int8Linear problem{x.data(),        weight.data(), scales.data(), weight_sums.data(),
                           bias_object.is_none() ? nullptr : bias.data(), out.mutable_data(), rows, in, out_features,
                           vnni_weight_object.is_none() ? nullptr : vnni_weight.data()};
  {
    py::gil_scoped_release release;
    chosen.run(problem, num_threads);
    if (activation == "gelu") gelu_inplace(problem.out, rows * out_features);  // one pass, on any isa
  }
  return out;
}

py::array_t<int8_t> vnni_pack(py::handle weight_object) {
  const auto weight = typed_array<int8_t>(weight_object, "weight", "int8", 2, true);
  const int64_t out_features = weight.shape(0), in = weight.shape(1);
  py::array_t<int8_t> packed({(out_features + 63) / 64, (in + 3) / 4, int64_t{64}, int64_t{4}});
  pack_for_vnni(weight.data(), out_features, in, packed.mutable_data());
  return packed;
}

}  // namespace

std::vector<std::string> int8_linear_isas() { return isa_names(supported()); }

void int8_linear(const Int8Linear& problem, int threads, const std::string& isa) {
  find(isa).run(problem, std::max(1, threads));
}

void register_int8_linear(py::module_& m) {
  m.def("int8_linear", &linear, py::arg("x"), py::arg("weight"), py::arg("scales"), py::arg("weight_sums"),
        py::arg("bias") = py::none(), py::arg("num_threads") = 1, py::arg("isa") = "auto",
        py::arg("vnni_weight") = py::none(), py::arg("activation") = "none",
        "An int8 linear with per-row dynamic uint8 activations: x float32 [rows, in] is quantized per row\n"
        "(asymmetric, its range and 0 over 255 steps), multiplied with weight int8 [out, in] (C-contiguous, read in\n"
        "place) in exact int32 sums, then scaled by the row's scale and scales[n] (+ bias). weight_sums int32 [out]\n"
        "= weight.sum(1). isa: 'auto' (the fastest) or one of int8_linear_isas(); every one gives the same bits.\n"
        "vnni_weight: int8_vnni_pack(weight), which the amx_int8 and avx512_vnni kernels read (without it, they pack\n"
        "weight per call). activation 'gelu' applies torch's exact GELU to the outputs (to a few ulps, the same bits\n"
        "on every isa). Returns float32 [rows, out].");
  m.def("int8_vnni_pack", &vnni_pack, py::arg("weight"),
        "int8 [out, in] -> int8 [ceil(out / 64), ceil(in / 4), 64, 4], zeros past out and in: per group of 64\n"
        "channels and step of 4 inputs, each channel's 4 weights side by side (the layout vpdpbusd sums from).");
  m.def("int8_linear_isas", &int8_linear_isas, "The instruction sets int8_linear runs on this CPU, best first.");
}

}  // namespace vivace
