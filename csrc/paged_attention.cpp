#include "paged_attention.h"

#include <pybind11/numpy.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "numpy_args.h"
#include "thread_pool.h"

// The build compiles without contraction (setup.py) for the sampler's exact arithmetic; this kernel's float32 sums
// carry their own tolerance, so it lets the compiler fuse multiply-adds.
#pragma GCC optimize("fp-contract=fast")

#if defined(__x86_64__) && defined(__GNUC__)
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

// A cached value as float32: float32 as it is, bfloat16 (its bits in a uint16_t) widened exactly.
INLINE float widen(float x) { return x; }
INLINE float widen(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float x;
  std::memcpy(&x, &wide, sizeof x);
  return x;
}

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

// Heads [h0, h1) of sequence s. Keys and values are read row by row, the heads of a row side by side, so that
// the reads stay sequential; every head's arithmetic is the same whatever the range it is computed in.
template <class T>
VECTOR_LOOP void attend(const PagedDecode& p, int64_t s, int64_t h0, int64_t h1, Scratch& scratch) {
  const T* key_cache = static_cast<const T*>(p.key_cache);
  const T* value_cache = static_cast<const T*>(p.value_cache);
  const int64_t length = p.context_lens[s], dim = p.head_dim, heads = h1 - h0;
  const int64_t block_floats = p.block_size * p.num_heads * dim, row_stride = p.num_heads * dim;
  const int32_t* table = p.block_tables + s * p.max_blocks;
  scratch.weights.resize(heads * length);
  scratch.partial.assign(heads * dim, 0.0f);
  scratch.sum.assign(heads * dim, 0.0);
  scratch.totals.resize(heads);
  float* __restrict weights = scratch.weights.data();
  float* __restrict partial = scratch.partial.data();
  double* __restrict sum = scratch.sum.data();
  double* __restrict total = scratch.totals.data();

  const float* query = p.query + (s * p.num_heads + h0) * dim;
  for (int64_t j0 = 0; j0 < length; j0 += p.block_size) {
    const T* block = key_cache + table[j0 / p.block_size] * block_floats + h0 * dim;
    for (int64_t j = j0; j < std::min(j0 + p.block_size, length); ++j)
      for (int64_t h = 0; h < heads; ++h)
        weights[h * length + j] = dot(query + h * dim, block + (j - j0) * row_stride + h * dim, dim) * p.scale;
  }
  for (int64_t h = 0; h < heads; ++h) {
    float* w = weights + h * length;
    if (p.distance_bias) {
      const float* bias = p.distance_bias + (h0 + h) * p.bias_width;
      const int64_t saturated = std::max<int64_t>(0, length - p.bias_width);  // keys at distance >= max_distance
      for (int64_t j = 0; j < saturated; ++j) w[j] += bias[p.bias_width - 1];
      for (int64_t j = saturated; j < length; ++j) w[j] += bias[length - 1 - j];
    }
    const float max = lane_max(w, length);
    for (int64_t j = 0; j < length; ++j) w[j] = exp_nonpositive(w[j] - max);
    total[h] = lane_sum(w, length);
  }

  int64_t pending = 0;
  for (int64_t j0 = 0; j0 < length; j0 += p.block_size) {
    const T* block = value_cache + table[j0 / p.block_size] * block_floats + h0 * dim;
    const int64_t j1 = std::min(j0 + p.block_size, length);
    for (int64_t j = j0; j < j1; ++j)
      for (int64_t h = 0; h < heads; ++h) {
        const float w = weights[h * length + j];
        const T* v = block + (j - j0) * row_stride + h * dim;
        float* acc = partial + h * dim;
        for (int64_t d = 0; d < dim; ++d) acc[d] += w * widen(v[d]);
      }
    pending += j1 - j0;
    if (pending >= kKeysPerPartial || j1 == length) {
      for (int64_t i = 0; i < heads * dim; ++i) {
        sum[i] += partial[i];
        partial[i] = 0.0f;
      }
      pending = 0;
    }
  }
  float* out = p.out + (s * p.num_heads + h0) * dim;
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t d = 0; d < dim; ++d) out[h * dim + d] = static_cast<float>(sum[h * dim + d] / total[h]);
}

py::array cache_array(py::handle object, const char* name) {
  py::array array = py::array::ensure(object);
  if (array && py::isinstance<py::array_t<int16_t>>(array))
    return typed_array<int16_t>(object, name, "float32 or int16 (bfloat16 bits)", 4, false);
  return typed_array<float>(object, name, "float32 or int16 (bfloat16 bits)", 4, false);
}

py::array_t<float> decode(py::handle query_object, py::handle key_object, py::handle value_object,
                          py::handle tables_object, py::handle lens_object, double scale, py::object bias_object,
                          int num_threads) {
  if (num_threads < 0) throw py::value_error("num_threads must be >= 0 (0 = one per hardware thread)");
  const auto query = typed_array<float>(query_object, "query", "float32", 3, true);
  // float32 caches, or bfloat16 ones passed as their bits (int16: numpy has no bfloat16)
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
  if (key_cache.shape(2) != num_heads || key_cache.shape(3) != head_dim || block_size == 0)
    throw py::value_error("key_cache " + shape_of(key_cache) + " must be [num_blocks, block_size >= 1, " +
                          std::to_string(num_heads) + ", " + std::to_string(head_dim) + "] for query " +
                          shape_of(query));
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
  py::array_t<float, py::array::c_style> bias;
  if (!bias_object.is_none()) {
    bias = typed_array<float>(bias_object, "distance_bias", "float32", 2, true);
    if (bias.shape(0) != num_heads || bias.shape(1) == 0)
      throw py::value_error("distance_bias " + shape_of(bias) + " must be [" + std::to_string(num_heads) +
                            ", max_distance + 1]");
  }

  py::array_t<float> out({num_seqs, num_heads, head_dim});
  const PagedDecode problem{query.data(), key_cache.data(), value_cache.data(),
                            py::isinstance<py::array_t<int16_t>>(key_cache), tables.data(), lens.data(),
                            bias_object.is_none() ? nullptr : bias.data(), out.mutable_data(), num_seqs, num_heads,
                            head_dim, block_size, max_blocks, bias_object.is_none() ? 0 : bias.shape(1),
                            static_cast<float>(scale)};
  static const int hardware_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int64_t wanted = num_threads ? num_threads : hardware_threads;
  const int threads = static_cast<int>(std::min<int64_t>(wanted, std::max<int64_t>(1, floats / kFloatsPerThread)));
  {
    py::gil_scoped_release release;
    paged_decode_attention(problem, threads);
  }
  return out;
}

}  // namespace

void paged_decode_attention(const PagedDecode& problem, int threads) {
  const int64_t num_seqs = problem.num_seqs, num_heads = problem.num_heads;
  if (num_seqs == 0 || num_heads == 0) return;
  // One item per sequence on one thread; on more, a few items per thread, so that ragged contexts balance.
  const int64_t groups = threads <= 1 ? 1 : std::min(num_heads, (2 * threads + num_seqs - 1) / num_seqs);
  std::atomic<bool> out_of_memory{false};
  parallel_for(num_seqs * groups, threads, [&](int64_t i) {
    thread_local Scratch scratch;
    const int64_t s = i / groups, g = i % groups;
    try {
      if (problem.bfloat16_cache)
        attend<uint16_t>(problem, s, g * num_heads / groups, (g + 1) * num_heads / groups, scratch);
      else
        attend<float>(problem, s, g * num_heads / groups, (g + 1) * num_heads / groups, scratch);
    } catch (const std::bad_alloc&) {
      out_of_memory = true;
    }
  });
  if (out_of_memory) throw std::bad_alloc();
}

void register_paged_attention(py::module_& m) {
  m.def("paged_decode_attention", &decode, py::arg("query"), py::arg("key_cache"), py::arg("value_cache"),
        py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"), py::arg("distance_bias") = py::none(),
        py::arg("num_threads") = 0,
        "Decode attention over a paged float32 KV cache, as vivace.kernels.paged_attention.paged_decode_attention.\n"
        "query [S, H, D]; key_cache, value_cache [num_blocks, block_size, H, D] (C-contiguous, read in place),\n"
        "float32 or bfloat16 as int16 bits (torch: cache.view(torch.int16));\n"
        "block_tables [S, max_blocks] int32; context_lens [S] int32 (the new token included); distance_bias\n"
        "[H, max_distance + 1] float32 or None. Slots past a context are never read. num_threads 0 = one per\n"
        "hardware thread, capped by the work. Returns float32 [S, H, D].");
}

}  // namespace vivace
