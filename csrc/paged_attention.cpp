#include "paged_attention.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "avx512_sums.h"
#include "numpy_args.h"
#include "thread_pool.h"

// The build compiles without contraction (setup.py) for the sampler's exact arithmetic; this kernel's float32 sums
// carry their own tolerance, so it lets the compiler fuse multiply-adds.
#pragma GCC optimize("fp-contract=fast")

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define VIVACE_X86 1
// Comparisons may then be if-converted into vector selects; no result changes.
#define VECTOR_LOOP \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), optimize("no-trapping-math")))
#define INLINE inline __attribute__((always_inline, optimize("no-trapping-math")))
#else
#define VECTOR_LOOP
#define INLINE inline
#endif

namespace vivace {
namespace {

namespace py = pybind11;

// Each thread gets at least this many cached key and value floats (~50 us at ~0.1 ns a float): below that, a
// second thread costs more to wake than it saves.
constexpr int64_t kFloatsPerThread = 1 << 19;
// Weighted values are summed in float32 over at least this many keys (whole blocks), then added in float64.
constexpr int64_t kKeysPerPartial = 16;
constexpr int kLanes = 16;

// Sixteen lanes added by a fixed tree (written out: as a loop over widths it is not unrolled).
template <class T>
INLINE T reduce(T* lanes) {
  for (int l = 0; l < 8; ++l) lanes[l] += lanes[l + 8];
  for (int l = 0; l < 4; ++l) lanes[l] += lanes[l + 4];
  return (lanes[0] + lanes[2]) + (lanes[1] + lanes[3]);
}

// A cached value as float32: float32 as it is, bfloat16 (its bits in a uint16_t) widened exactly, int8 as its
// integer (its row's scale is applied once per row, by row_scale).
INLINE float widen(float x) { return x; }
INLINE float widen(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float x;
  std::memcpy(&x, &wide, sizeof x);
  return x;
}
INLINE float widen(int8_t x) { return static_cast<float>(x); }

// The factor a row's widened values take: 1 for float32 and bfloat16 (x * 1 is x exactly, so those kernels' bits
// do not change), an int8 row's scale.
template <class T>
INLINE float row_scale(const T*, int64_t) { return 1.0f; }
INLINE float row_scale(const int8_t* row, int64_t dim) { return int8_row_scale(row, dim); }

template <class T>
INLINE float dot(const float* a, const T* b, int64_t n) {
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += a[i + l] * widen(b[i + l]);
  float tail = 0.0f;
  for (; i < n; ++i) tail += a[i] * widen(b[i]);
  return reduce(lanes) + tail;
}

// exp(x) for x <= 0 (Cephes' expf polynomial, within 1 ulp), written to vectorize: 0 below -87, NaN kept.
INLINE float exp_nonpositive(float x) {
  const float clamped = x > -87.0f ? x : -87.0f;
  const float n = __builtin_floorf(clamped * 1.44269504088896341f + 0.5f);
  const float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  const float y = x > -87.0f ? p * two_n : 0.0f;
  return x != x ? x : y;
}

INLINE float lane_max(const float* x, int64_t n) {
  float lanes[kLanes];
  for (int l = 0; l < kLanes; ++l) lanes[l] = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] = x[i + l] > lanes[l] ? x[i + l] : lanes[l];
  for (; i < n; ++i) lanes[0] = x[i] > lanes[0] ? x[i] : lanes[0];
  for (int l = 1; l < kLanes; ++l) lanes[0] = lanes[l] > lanes[0] ? lanes[l] : lanes[0];
  return lanes[0];
}

INLINE double lane_sum(const float* x, int64_t n) {
  double lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += x[i + l];
  for (; i < n; ++i) lanes[0] += x[i];
  return reduce(lanes);
}

struct Scratch {
  std::vector<float> weights, partial;
  std::vector<double> sum, totals;
};

// Heads [h0, h1) of sequence s as one work item sees them: where its keys and values lie, and its scratch (scores
// then weights per head and key; weighted values per head and dim, in float32 over a few blocks and in float64).
struct HeadRange {
  HeadRange(const PagedDecode& p, int64_t s, int64_t h0, int64_t h1, Scratch& scratch)
      : query(p.query + (s * p.num_heads + h0) * p.head_dim),
        out(p.out + (s * p.num_heads + h0) * p.head_dim),
        table(p.block_tables + s * p.max_blocks),
        h0(h0),
        heads(h1 - h0),
        dim(p.head_dim),
        head_stride(cache_row_width(p.cache_format, p.head_dim)),
        length(p.context_lens[s]),
        block_elements(p.block_size * p.num_heads * head_stride),
        row_stride(p.num_heads * head_stride) {
    scratch.weights.resize(heads * length);
    scratch.partial.assign(heads * dim, 0.0f);
    scratch.sum.assign(heads * dim, 0.0);
    scratch.totals.resize(heads);
    weights = scratch.weights.data();
    partial = scratch.partial.data();
    sum = scratch.sum.data();
    total = scratch.totals.data();
  }

  // The first of this range's elements in block b of a cache.
  template <class T>
  const T* block(const void* cache, int64_t b) const {
    return static_cast<const T*>(cache) + table[b] * block_elements + h0 * head_stride;
  }

  const float* query;
  float* out;
  const int32_t* table;
  int64_t h0, heads, dim, head_stride, length, block_elements, row_stride;  // strides in cache elements
  float* __restrict weights;
  float* __restrict partial;
  double* __restrict sum;
  double* __restrict total;
};

// Heads [h0, h0 + heads) of one sequence: distance bias added to the scores, scores turned into unnormalised
// weights exp(score - max), and their sums in float64.
VECTOR_LOOP void softmax(const PagedDecode& p, HeadRange& r) {
  for (int64_t h = 0; h < r.heads; ++h) {
    float* w = r.weights + h * r.length;
    const int64_t length = r.length;
    if (p.distance_bias) {
      const float* bias = p.distance_bias + (r.h0 + h) * p.bias_width;
      const int64_t saturated = std::max<int64_t>(0, length - p.bias_width);  // keys at distance >= max_distance
      for (int64_t j = 0; j < saturated; ++j) w[j] += bias[p.bias_width - 1];
      for (int64_t j = saturated; j < length; ++j) w[j] += bias[length - 1 - j];
    }
    const float max = lane_max(w, length);
    for (int64_t j = 0; j < length; ++j) w[j] = exp_nonpositive(w[j] - max);
    r.total[h] = lane_sum(w, length);
  }
}

// The float32 partial sums of weighted values added into the float64 ones (every kKeysPerPartial keys or more).
VECTOR_LOOP void flush(HeadRange& r) {
  for (int64_t i = 0; i < r.heads * r.dim; ++i) {
    r.sum[i] += r.partial[i];
    r.partial[i] = 0.0f;
  }
}

VECTOR_LOOP void normalise(HeadRange& r) {
  for (int64_t h = 0; h < r.heads; ++h)
    for (int64_t d = 0; d < r.dim; ++d) r.out[h * r.dim + d] = static_cast<float>(r.sum[h * r.dim + d] / r.total[h]);
}

// Any head_dim, any x86 or other CPU. Keys and values are read row by row, the heads of a row side by side, so
// that the reads stay sequential; every head's arithmetic is the same whatever the range it is computed in.
template <class T>
VECTOR_LOOP void attend_portable(const PagedDecode& p, HeadRange& r) {
  const int64_t length = r.length, dim = r.dim, heads = r.heads;
  for (int64_t j0 = 0; j0 < length; j0 += p.block_size) {
    const T* block = r.block<T>(p.key_cache, j0 / p.block_size);
    for (int64_t j = j0; j < std::min(j0 + p.block_size, length); ++j)
      for (int64_t h = 0; h < heads; ++h) {
        const T* key = block + (j - j0) * r.row_stride + h * r.head_stride;
        r.weights[h * length + j] = dot(r.query + h * dim, key, dim) * row_scale(key, dim) * p.scale;
      }
  }
  softmax(p, r);
  int64_t pending = 0;
  for (int64_t j0 = 0; j0 < length; j0 += p.block_size) {
    const T* block = r.block<T>(p.value_cache, j0 / p.block_size);
    const int64_t j1 = std::min(j0 + p.block_size, length);
    for (int64_t j = j0; j < j1; ++j)
      for (int64_t h = 0; h < heads; ++h) {
        const T* v = block + (j - j0) * r.row_stride + h * r.head_stride;
        const float w = r.weights[h * length + j] * row_scale(v, dim);
        float* acc = r.partial + h * dim;
        for (int64_t d = 0; d < dim; ++d) acc[d] += w * widen(v[d]);
      }
    pending += j1 - j0;
    if (pending >= kKeysPerPartial || j1 == length) {
      flush(r);
      pending = 0;
    }
  }
  normalise(r);
}

#ifdef VIVACE_X86
#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {

// Sixteen cached values as float32: float32 as stored, bfloat16 bits shifted into the high half (exact).
inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16(const uint16_t* x) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline __m512 load16(const int8_t* x) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))));
}

// A block's rows of this range, one prefetch per cache line, while the current block is computed: blocks lie
// anywhere in the pool, so the hardware prefetcher cannot see the jump to the next one coming. Into L2 (T2 hint),
// not L1, and row by row rather than a block at once: both of those stalled on the fill buffers
// (docs/performance.md, "CPU decode attention, AVX-512 form").
template <class T>
inline void prefetch_rows(const T* block, int64_t first, int64_t last, const HeadRange& r) {
  if (!block) return;
  const int64_t bytes = r.heads * r.head_stride * static_cast<int64_t>(sizeof(T));
  for (int64_t row = first; row < last; ++row) {
    const char* line = reinterpret_cast<const char*>(block + row * r.row_stride);
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(line + b, _MM_HINT_T2);
  }
}

// q . k summed in sixteen lanes over the dims (kDim / 16 multiply-adds), times an int8 row's scale.
template <class T, int kDim>
__attribute__((always_inline)) inline __m512 key_lanes(const float* q, const T* key) {
  __m512 a = _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int d = 0; d < kDim; d += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), load16(key + d), a);
  if constexpr (std::is_same_v<T, int8_t>) a = _mm512_mul_ps(a, _mm512_set1_ps(int8_row_scale(key, kDim)));
  return a;
}

// Sixteen vectors' lane sums as one vector (lanes_of(i) for i < count, zeros past it), by one transpose tree. The
// vectors are written out, not filled in a loop: GCC keeps a loop-filled array on the stack. Each sum's tree is
// the same whichever vectors it is reduced beside.
template <class LanesOf>
__attribute__((always_inline)) inline __m512 sums16(int64_t count, const LanesOf& lanes_of) {
#define VIVACE_LANES(i) _mm512_castps_si512(i < count ? lanes_of(i) : _mm512_setzero_ps())
  const __m512i lanes[16] = {VIVACE_LANES(0),  VIVACE_LANES(1),  VIVACE_LANES(2),  VIVACE_LANES(3),
                             VIVACE_LANES(4),  VIVACE_LANES(5),  VIVACE_LANES(6),  VIVACE_LANES(7),
                             VIVACE_LANES(8),  VIVACE_LANES(9),  VIVACE_LANES(10), VIVACE_LANES(11),
                             VIVACE_LANES(12), VIVACE_LANES(13), VIVACE_LANES(14), VIVACE_LANES(15)};
#undef VIVACE_LANES
  return _mm512_castsi512_ps(transpose_sums(lanes, AddFloat{}));
}

// Scores of one block's keys, scale * (q_h . k_j), into weights[h * length + j0 + j]. Narrow rows (a few heads):
// head by head, sixteen keys reduced together. Wide rows (2 KB or more: reading one head's sixteen keys would
// stride 2-4 KB, which maps them onto a few L1 sets): key by key, sixteen heads reduced together, so the block
// is read in order. A score's arithmetic is the same either way.
template <class T, int kDim>
void block_scores(const PagedDecode& p, HeadRange& r, const T* block, int64_t j0, int64_t rows, bool wide,
                  const T* next, int64_t next_rows) {
  const __m512 scale = _mm512_set1_ps(p.scale);
  if (!wide) {
    for (int64_t h = 0; h < r.heads; ++h) {
      prefetch_rows(next, h * next_rows / r.heads, (h + 1) * next_rows / r.heads, r);
      for (int64_t j = 0; j < rows; j += 16) {
        const float* q = r.query + h * kDim;
        const T* key = block + j * r.row_stride + h * r.head_stride;
        const int64_t count = std::min<int64_t>(16, rows - j);
        const __m512 sums = sums16(count, [&](int i) __attribute__((always_inline)) {
          return key_lanes<T, kDim>(q, key + i * r.row_stride);
        });
        _mm512_mask_storeu_ps(r.weights + h * r.length + j0 + j, static_cast<__mmask16>((1u << count) - 1),
                              _mm512_mul_ps(sums, scale));
      }
    }
    return;
  }
  alignas(64) float scores[16];
  for (int64_t j = 0; j < rows; ++j) {
    prefetch_rows(next, j * next_rows / rows, (j + 1) * next_rows / rows, r);
    for (int64_t h = 0; h < r.heads; h += 16) {
      const float* q = r.query + h * kDim;
      const T* key = block + j * r.row_stride + h * r.head_stride;
      const int64_t count = std::min<int64_t>(16, r.heads - h);
      _mm512_store_ps(scores, _mm512_mul_ps(sums16(count, [&](int i) __attribute__((always_inline)) {
                        return key_lanes<T, kDim>(q + i * kDim, key + i * r.head_stride);
                      }), scale));
      for (int64_t i = 0; i < count; ++i) r.weights[(h + i) * r.length + j0 + j] = scores[i];
    }
  }
}

// partial[h] += w[h, j] * v_j,h over one block's keys, each element's sum in key order (the portable kernel's):
// narrow rows head by head with the sums in registers, wide rows key by key (read in order, as block_scores).
template <class T, int kDim>
void block_values(HeadRange& r, const T* block, int64_t j0, int64_t rows, bool wide, const T* next,
                  int64_t next_rows) {
  if (!wide) {
    for (int64_t h = 0; h < r.heads; ++h) {
      prefetch_rows(next, h * next_rows / r.heads, (h + 1) * next_rows / r.heads, r);
      const float* w = r.weights + h * r.length + j0;
      float* acc = r.partial + h * kDim;
      __m512 a[kDim / 16];
#pragma GCC unroll 8
      for (int c = 0; c < kDim / 16; ++c) a[c] = _mm512_loadu_ps(acc + 16 * c);
      for (int64_t j = 0; j < rows; ++j) {
        const T* v = block + j * r.row_stride + h * r.head_stride;
        const __m512 weight = _mm512_set1_ps(w[j] * row_scale(v, kDim));
#pragma GCC unroll 8
        for (int c = 0; c < kDim / 16; ++c) a[c] = _mm512_fmadd_ps(weight, load16(v + 16 * c), a[c]);
      }
#pragma GCC unroll 8
      for (int c = 0; c < kDim / 16; ++c) _mm512_storeu_ps(acc + 16 * c, a[c]);
    }
    return;
  }
  for (int64_t j = 0; j < rows; ++j) {
    prefetch_rows(next, j * next_rows / rows, (j + 1) * next_rows / rows, r);
    for (int64_t h = 0; h < r.heads; ++h) {
      const T* v = block + j * r.row_stride + h * r.head_stride;
      const __m512 weight = _mm512_set1_ps(r.weights[h * r.length + j0 + j] * row_scale(v, kDim));
      float* acc = r.partial + h * kDim;
#pragma GCC unroll 8
      for (int c = 0; c < kDim / 16; ++c)
        _mm512_storeu_ps(acc + 16 * c, _mm512_fmadd_ps(weight, load16(v + 16 * c), _mm512_loadu_ps(acc + 16 * c)));
    }
  }
}

// head_dim = kDim (a multiple of 16): block by block, every head of the range per block, the next block prefetched.
template <class T, int kDim>
void attend(const PagedDecode& p, HeadRange& r) {
  const int64_t length = r.length, block_size = p.block_size;
  const int64_t blocks = (length + block_size - 1) / block_size;
  const bool wide = r.row_stride * static_cast<int64_t>(sizeof(T)) >= 2048;
  auto rows = [&](int64_t b) { return std::min(block_size, length - b * block_size); };
  for (int64_t b = 0; b < blocks; ++b) {
    const bool last = b + 1 == blocks;  // then the first block of values comes next
    block_scores<T, kDim>(p, r, r.block<T>(p.key_cache, b), b * block_size, rows(b), wide,
                          last ? r.block<T>(p.value_cache, 0) : r.block<T>(p.key_cache, b + 1), rows(last ? 0 : b + 1));
  }
  softmax(p, r);
  int64_t pending = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    const bool last = b + 1 == blocks;
    block_values<T, kDim>(r, r.block<T>(p.value_cache, b), b * block_size, rows(b), wide,
                          last ? nullptr : r.block<T>(p.value_cache, b + 1), last ? 0 : rows(b + 1));
    pending += rows(b);
    if (pending >= kKeysPerPartial || b + 1 == blocks) {
      flush(r);
      pending = 0;
    }
  }
  normalise(r);
}

}  // namespace avx512
#pragma GCC pop_options
#endif

using AttendFn = void (*)(const PagedDecode&, HeadRange&);

// The AVX-512 kernel where the CPU has AVX-512F and head_dim is one it is built for; the portable one otherwise.
template <class T>
AttendFn kernel_for(int64_t head_dim, AttentionIsa isa) {
#ifdef VIVACE_X86
  if (isa != AttentionIsa::kPortable && avx512_attention_supported(head_dim)) switch (head_dim) {
      case 32: return avx512::attend<T, 32>;
      case 64: return avx512::attend<T, 64>;
      case 128: return avx512::attend<T, 128>;
      default: break;
    }
#endif
  return attend_portable<T>;
}

py::array cache_array(py::handle object, const std::string& name) {
  py::array array = py::array::ensure(object);
  if (!array) throw py::value_error(name + " must be a numpy array or a CPU tensor");
  cache_format(array, name);
  if (array.ndim() != 4) throw py::value_error(name + " must have 4 dimensions, got shape " + shape_of(array));
  if (!(array.flags() & py::array::c_style)) throw py::value_error(name + " must be C-contiguous (it is not copied)");
  return array;
}

py::array_t<float> decode(py::handle query_object, py::handle key_object, py::handle value_object,
                          py::handle tables_object, py::handle lens_object, double scale, py::object bias_object,
                          int num_threads, const std::string& isa_name) {
  if (num_threads < 0) throw py::value_error("num_threads must be >= 0 (0 = one per hardware thread)");
  if (isa_name != "auto" && isa_name != "avx512" && isa_name != "portable")
    throw py::value_error("isa must be \"auto\", \"avx512\" or \"portable\", got \"" + isa_name + "\"");
  const AttentionIsa isa = isa_name == "portable" ? AttentionIsa::kPortable : AttentionIsa::kAuto;
  const auto query = typed_array<float>(query_object, "query", "float32", 3, true);
  // float32 caches, bfloat16 ones passed as their bits (int16: numpy has no bfloat16), or int8 rows with their scale
  const py::array key_cache = cache_array(key_object, "key_cache");
  const py::array value_cache = cache_array(value_object, "value_cache");
  if (!key_cache.dtype().is(value_cache.dtype()))
    throw py::value_error("key_cache and value_cache must have the same dtype, got " +
                          py::str(key_cache.dtype()).cast<std::string>() + " and " +
                          py::str(value_cache.dtype()).cast<std::string>());
  const auto tables = typed_array<int32_t>(tables_object, "block_tables", "int32", 2, true);
  const auto lens = typed_array<int32_t>(lens_object, "context_lens", "int32", 1, true);
  const int64_t num_seqs = query.shape(0), num_heads = query.shape(1), head_dim = query.shape(2);
  const int64_t num_blocks = key_cache.shape(0), block_size = key_cache.shape(1), max_blocks = tables.shape(1);
  for (int d = 0; d < 4; ++d)
    if (value_cache.shape(d) != key_cache.shape(d))
      throw py::value_error("key_cache " + shape_of(key_cache) + " and value_cache " + shape_of(value_cache) +
                            " must have the same shape");
  const CacheFormat format = cache_format(key_cache, "key_cache");
  const int64_t row = cache_row_width(format, head_dim);
  if (key_cache.shape(2) != num_heads || key_cache.shape(3) != row || block_size == 0)
    throw py::value_error("key_cache " + shape_of(key_cache) + " must be [num_blocks, block_size >= 1, " +
                          std::to_string(num_heads) + ", " + std::to_string(row) + "] for query " +
                          shape_of(query) + " (" + cache_format_name(format) + " rows)");
  if (tables.shape(0) != num_seqs || lens.shape(0) != num_seqs)
    throw py::value_error("block_tables " + shape_of(tables) + " and context_lens " + shape_of(lens) + " must have " +
                          std::to_string(num_seqs) + " rows, one per query");
  int64_t floats = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t length = lens.data()[s];
    if (length < 1 || length > max_blocks * block_size)
      throw py::value_error("context_lens[" + std::to_string(s) + "] = " + std::to_string(length) + " is outside [1, " +
                            std::to_string(max_blocks * block_size) + "], what its block table holds");
    for (int64_t b = 0; b * block_size < length; ++b) {
      const int64_t block = tables.data()[s * max_blocks + b];
      if (block < 0 || block >= num_blocks)
        throw py::value_error("block_tables[" + std::to_string(s) + ", " + std::to_string(b) + "] = " +
                              std::to_string(block) + " is not a block of the " + std::to_string(num_blocks) +
                              "-block cache");
    }
    floats += 2 * length * num_heads * head_dim;
  }
  const auto bias = distance_bias_argument(bias_object, num_heads);

  if (isa_name == "avx512" && !avx512_attention_supported(head_dim))
    throw py::value_error("isa \"avx512\" needs a CPU with AVX-512F and head_dim 32, 64 or 128 (head_dim " +
                          std::to_string(head_dim) + ")");
  py::array_t<float> out({num_seqs, num_heads, head_dim});
  const PagedDecode problem{query.data(), key_cache.data(), value_cache.data(), format, tables.data(), lens.data(),
                            bias_object.is_none() ? nullptr : bias.data(), out.mutable_data(), num_seqs, num_heads,
                            head_dim, block_size, max_blocks, bias_object.is_none() ? 0 : bias.shape(1),
                            static_cast<float>(scale)};
  const int threads = decode_attention_threads(floats, num_threads);
  {
    py::gil_scoped_release release;
    paged_decode_attention(problem, threads, isa);
  }
  return out;
}

}  // namespace

int decode_attention_threads(int64_t floats, int wanted) {
  static const int hardware_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int64_t threads = wanted ? wanted : hardware_threads;
  return static_cast<int>(std::min<int64_t>(threads, std::max<int64_t>(1, floats / kFloatsPerThread)));
}

bool avx512_attention_supported(int64_t head_dim) {
#ifdef VIVACE_X86
  static const bool has_avx512 = __builtin_cpu_supports("avx512f");
  return has_avx512 && (head_dim == 32 || head_dim == 64 || head_dim == 128);
#else
  return false;
#endif
}

void paged_decode_attention(const PagedDecode& problem, int threads, AttentionIsa isa) {
  const int64_t num_seqs = problem.num_seqs, num_heads = problem.num_heads;
  if (num_seqs == 0 || num_heads == 0) return;
  const AttendFn attend = problem.cache_format == CacheFormat::kBFloat16 ? kernel_for<uint16_t>(problem.head_dim, isa)
                         : problem.cache_format == CacheFormat::kInt8   ? kernel_for<int8_t>(problem.head_dim, isa)
                                                                        : kernel_for<float>(problem.head_dim, isa);
  // One item per sequence on one thread; on more, a few items per thread, so that ragged contexts balance.
  const int64_t groups = threads <= 1 ? 1 : std::min(num_heads, (2 * threads + num_seqs - 1) / num_seqs);
  std::atomic<bool> out_of_memory{false};
  parallel_for(num_seqs * groups, threads, [&](int64_t i) {
    thread_local Scratch scratch;
    const int64_t s = i / groups, g = i % groups;
    try {
      HeadRange range(problem, s, g * num_heads / groups, (g + 1) * num_heads / groups, scratch);
      attend(problem, range);
    } catch (const std::bad_alloc&) {
      out_of_memory = true;
    }
  });
  if (out_of_memory) throw std::bad_alloc();
}

py::array_t<float, py::array::c_style> distance_bias_argument(const py::object& object, int64_t num_heads) {
  py::array_t<float, py::array::c_style> bias;
  if (object.is_none()) return bias;
  bias = typed_array<float>(object, "distance_bias", "float32", 2, true);
  if (bias.shape(0) != num_heads || bias.shape(1) == 0)
    throw py::value_error("distance_bias " + shape_of(bias) + " must be [" + std::to_string(num_heads) +
                          ", max_distance + 1]");
  return bias;
}

void register_paged_attention(py::module_& m) {
  m.def("paged_decode_attention", &decode, py::arg("query"), py::arg("key_cache"), py::arg("value_cache"),
        py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"), py::arg("distance_bias") = py::none(),
        py::arg("num_threads") = 0, py::arg("isa") = "auto",
        "Decode attention over a paged float32 KV cache, as vivace.kernels.paged_attention.paged_decode_attention.\n"
        "query [S, H, D]; key_cache, value_cache [num_blocks, block_size, H, D] (C-contiguous, read in place),\n"
        "float32 or bfloat16 as int16 bits (torch: cache.view(torch.int16)), or int8 [num_blocks, block_size, H, D + 4]:\n"
        "each row's D values and its float32 scale in the last 4 bytes (vivace.kernels.kv_int8);\n"
        "block_tables [S, max_blocks] int32; context_lens [S] int32 (the new token included); distance_bias\n"
        "[H, max_distance + 1] float32 or None. Slots past a context are never read. num_threads 0 = one per\n"
        "hardware thread, capped by the work. isa \"auto\": the AVX-512 kernel where the CPU has AVX-512F and head_dim is\n"
        "32, 64 or 128, the portable one otherwise; \"avx512\" or \"portable\" fix one. Returns float32 [S, H, D].");
  m.def(
      "paged_attention_isas",
      [](int64_t head_dim) {
        std::vector<std::string> isas;
        if (avx512_attention_supported(head_dim)) isas.push_back("avx512");
        isas.push_back("portable");
        return isas;
      },
      py::arg("head_dim"), "The isa values paged_decode_attention runs for this head_dim on this CPU, fastest first.");
}

}  // namespace vivace
