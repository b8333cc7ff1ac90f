#include "kv_store.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

#include "kv_cache_format.h"
#include "numpy_args.h"

namespace vivace {
namespace {

// float32 -> bfloat16 bits as torch's tensor conversion (Tensor.to) gives them: round to nearest even, every NaN
// to 0xffff (its vectorized path's NaN; a scalar c10::BFloat16 would be 0x7fc0).
inline uint16_t to_bfloat16(float value) {
  if (std::isnan(value)) return 0xffff;
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return static_cast<uint16_t>((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

// Tokens' rows of a [tokens, heads, head_dim] float32 array that may be a strided view (a key or value split
// from a fused qkv projection), its head_dim contiguous.
struct TokenRows {
  const char* data;
  py::ssize_t token_stride, head_stride;

  const float* row(int64_t token, int64_t head) const {
    return reinterpret_cast<const float*>(data + token * token_stride + head * head_stride);
  }
};

TokenRows token_rows(const py::array& array, const char* name, int64_t tokens, int64_t heads, int64_t head_dim) {
  if (!py::isinstance<py::array_t<float>>(array))
    throw py::value_error(std::string(name) + " must have dtype float32, got " + py::str(array.dtype()).cast<std::string>());
  if (array.ndim() != 3 || array.shape(0) != tokens || array.shape(1) != heads || array.shape(2) != head_dim)
    throw py::value_error(std::string(name) + " " + shape_of(array) + " must be [" + std::to_string(tokens) + ", " +
                          std::to_string(heads) + ", " + std::to_string(head_dim) + "] (tokens, the cache's heads and head_dim)");
  if (head_dim > 1 && array.strides(2) != static_cast<py::ssize_t>(sizeof(float)))
    throw py::value_error(std::string(name) + " must have contiguous rows of head_dim values");
  return {static_cast<const char*>(array.data()), array.strides(0), array.strides(1)};
}

#if defined(__x86_64__) && defined(__GNUC__)
// Vectorized per CPU (the compiler's own loops; no result depends on the form chosen).
#define QUANTIZE_LOOP __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), optimize("no-trapping-math")))
#else
#define QUANTIZE_LOOP
#endif

// A row as int8 values and its scale (kv_cache_format.h), as vivace.kernels.kv_int8.quantize_rows computes them:
// s = max|x| / 127 and q = x / s rounded to nearest even, in float32; a row of zeros gets s = 0 and q = 0, a row
// holding a NaN or an infinity a NaN scale and q = 0.
QUANTIZE_LOOP void quantize_row(const float* row, int8_t* out, int64_t head_dim) {
  constexpr int kLanes = 16;
  float lanes[kLanes] = {}, probe[kLanes] = {};  // probe: x * 0 is NaN for a NaN or an infinity, else 0
  int64_t d = 0;
  for (; d + kLanes <= head_dim; d += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float a = __builtin_fabsf(row[d + l]);
      lanes[l] = a > lanes[l] ? a : lanes[l];
      probe[l] += row[d + l] * 0.0f;
    }
  for (; d < head_dim; ++d) {
    const float a = __builtin_fabsf(row[d]);
    lanes[0] = a > lanes[0] ? a : lanes[0];
    probe[0] += row[d] * 0.0f;
  }
  float max = 0.0f, finite = 0.0f;
  for (int l = 0; l < kLanes; ++l) {
    max = lanes[l] > max ? lanes[l] : max;
    finite += probe[l];
  }
  if (finite != finite) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::memset(out, 0, head_dim);
    std::memcpy(out + head_dim, &nan, sizeof nan);
    return;
  }
  const float scale = max / 127.0f;
  // |x / s| <= 127 here, so adding and taking away 1.5 * 2**23 rounds it to nearest even, as nearbyint does
  // (the build does not reassociate float arithmetic), in a form the compiler vectorizes.
  constexpr float kRound = 12582912.0f;
  if (scale > 0.0f) {
    for (d = 0; d < head_dim; ++d) {
      const float q = (row[d] / scale + kRound) - kRound;
      out[d] = static_cast<int8_t>(q < -127.0f ? -127.0f : q > 127.0f ? 127.0f : q);
    }
  } else {
    std::memset(out, 0, head_dim);
  }
  std::memcpy(out + head_dim, &scale, sizeof scale);
}

template <class Cache>
void write(const TokenRows& rows, Cache* cache, const int64_t* slots, int64_t tokens, int64_t heads, int64_t head_dim) {
  const int64_t width = cache_row_width(sizeof(Cache) == 1 ? CacheFormat::kInt8 : CacheFormat::kFloat32, head_dim);
  for (int64_t t = 0; t < tokens; ++t) {
    if (slots[t] < 0) continue;
    Cache* slot = cache + slots[t] * heads * width;
    for (int64_t h = 0; h < heads; ++h) {
      const float* row = rows.row(t, h);
      Cache* out = slot + h * width;
      if constexpr (sizeof(Cache) == sizeof(float)) {
        std::memcpy(out, row, head_dim * sizeof(float));
      } else if constexpr (sizeof(Cache) == 1) {
        quantize_row(row, out, head_dim);
      } else {
        for (int64_t d = 0; d < head_dim; ++d) out[d] = to_bfloat16(row[d]);
      }
    }
  }
}

void write_both(const TokenRows& keys, const TokenRows& values, void* key_cache, void* value_cache, CacheFormat format,
                const int64_t* slots, int64_t tokens, int64_t heads, int64_t head_dim) {
  switch (format) {
    case CacheFormat::kFloat32:
      write(keys, static_cast<float*>(key_cache), slots, tokens, heads, head_dim);
      write(values, static_cast<float*>(value_cache), slots, tokens, heads, head_dim);
      return;
    case CacheFormat::kBFloat16:
      write(keys, static_cast<uint16_t*>(key_cache), slots, tokens, heads, head_dim);
      write(values, static_cast<uint16_t*>(value_cache), slots, tokens, heads, head_dim);
      return;
    case CacheFormat::kInt8:
      write(keys, static_cast<int8_t*>(key_cache), slots, tokens, heads, head_dim);
      write(values, static_cast<int8_t*>(value_cache), slots, tokens, heads, head_dim);
      return;
  }
}

void store(py::handle key_object, py::handle value_object, py::handle key_cache_object, py::handle value_cache_object,
           py::handle slots_object) {
  py::array key_cache = py::array::ensure(key_cache_object), value_cache = py::array::ensure(value_cache_object);
  if (!key_cache || !value_cache) throw py::value_error("key_cache and value_cache must be numpy arrays or CPU tensors");
  const CacheFormat format = cache_format(key_cache, "key_cache");
  if (!key_cache.dtype().is(value_cache.dtype()) || key_cache.ndim() != 4 || value_cache.ndim() != 4)
    throw py::value_error("key_cache " + shape_of(key_cache) + " and value_cache " + shape_of(value_cache) +
                          " must be [num_blocks, block_size, heads, head_dim] of one dtype");
  for (py::ssize_t d = 0; d < 4; ++d)
    if (key_cache.shape(d) != value_cache.shape(d))
      throw py::value_error("key_cache " + shape_of(key_cache) + " and value_cache " + shape_of(value_cache) +
                            " must have one shape");
  if (!(key_cache.flags() & py::array::c_style) || !(value_cache.flags() & py::array::c_style) || !key_cache.writeable() ||
      !value_cache.writeable())
    throw py::value_error("key_cache and value_cache must be writeable and C-contiguous (they are written in place)");
  const auto slots = typed_array<int64_t>(slots_object, "slot_mapping", "int64", 1, true);
  const int64_t tokens = slots.shape(0), heads = key_cache.shape(2);
  const int64_t head_dim = key_cache.shape(3) - (format == CacheFormat::kInt8 ? kInt8ScaleBytes : 0);
  if (head_dim < 1) throw py::value_error("key_cache " + shape_of(key_cache) + " has int8 rows too short for their scale");
  const int64_t num_slots = key_cache.shape(0) * key_cache.shape(1);
  const TokenRows keys = token_rows(py::array::ensure(key_object), "key", tokens, heads, head_dim);
  const TokenRows values = token_rows(py::array::ensure(value_object), "value", tokens, heads, head_dim);
  const int64_t* slot = slots.data();
  for (int64_t t = 0; t < tokens; ++t)
    if (slot[t] >= num_slots)
      throw py::value_error("slot_mapping holds slot " + std::to_string(slot[t]) + ", past the " +
                            std::to_string(num_slots) + "-slot cache");
  write_both(keys, values, key_cache.mutable_data(), value_cache.mutable_data(), format, slot, tokens, heads, head_dim);
}

}  // namespace

void store_kv_rows(const float* keys, const float* values, int64_t token_stride, void* key_cache, void* value_cache,
                   CacheFormat format, const int64_t* slots, int64_t tokens, int64_t heads, int64_t head_dim) {
  const auto stride = static_cast<py::ssize_t>(token_stride * sizeof(float));
  const auto head_stride = static_cast<py::ssize_t>(head_dim * sizeof(float));
  const TokenRows key_rows{reinterpret_cast<const char*>(keys), stride, head_stride};
  const TokenRows value_rows{reinterpret_cast<const char*>(values), stride, head_stride};
  write_both(key_rows, value_rows, key_cache, value_cache, format, slots, tokens, heads, head_dim);
}

void register_kv_store(py::module_& m) {
  m.def("store_kv", &store, py::arg("key"), py::arg("value"), py::arg("key_cache"), py::arg("value_cache"),
        py::arg("slot_mapping"),
        "Writes each token's key and value into its cache slot, as vivace.kernels.paged_attention.store_kv, in place.\n"
        "key, value float32 [tokens, heads, head_dim] (strided views allowed, head_dim contiguous); key_cache,\n"
        "value_cache [num_blocks, block_size, heads, head_dim], C-contiguous, float32 or bfloat16 as int16 bits\n"
        "(torch: cache.view(torch.int16); values rounded as Tensor.to(torch.bfloat16) rounds them), or int8\n"
        "[num_blocks, block_size, heads, head_dim + 4] rows quantized as vivace.kernels.kv_int8.quantize_rows; slot_mapping\n"
        "int64 [tokens], slot = block * block_size + row; a negative slot (a padding row) is skipped.");
}

}  // namespace vivace
