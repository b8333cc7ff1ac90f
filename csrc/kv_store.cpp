#include "kv_store.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

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

template <class Cache>
void write(const TokenRows& rows, Cache* cache, const int64_t* slots, int64_t tokens, int64_t heads, int64_t head_dim) {
  for (int64_t t = 0; t < tokens; ++t) {
    if (slots[t] < 0) continue;
    Cache* slot = cache + slots[t] * heads * head_dim;
    for (int64_t h = 0; h < heads; ++h) {
      const float* row = rows.row(t, h);
      Cache* out = slot + h * head_dim;
      if constexpr (sizeof(Cache) == sizeof(float)) {
        std::memcpy(out, row, head_dim * sizeof(float));
      } else {
        for (int64_t d = 0; d < head_dim; ++d) out[d] = to_bfloat16(row[d]);
      }
    }
  }
}

void store(py::handle key_object, py::handle value_object, py::handle key_cache_object, py::handle value_cache_object,
           py::handle slots_object) {
  py::array key_cache = py::array::ensure(key_cache_object), value_cache = py::array::ensure(value_cache_object);
  if (!key_cache || !value_cache) throw py::value_error("key_cache and value_cache must be numpy arrays or CPU tensors");
  const bool bfloat16 = py::isinstance<py::array_t<int16_t>>(key_cache);
  if (!bfloat16 && !py::isinstance<py::array_t<float>>(key_cache))
    throw py::value_error("key_cache must have dtype float32, or int16 holding bfloat16 bits, got " +
                          py::str(key_cache.dtype()).cast<std::string>());
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
  const int64_t tokens = slots.shape(0), heads = key_cache.shape(2), head_dim = key_cache.shape(3);
  const int64_t num_slots = key_cache.shape(0) * key_cache.shape(1);
  const TokenRows keys = token_rows(py::array::ensure(key_object), "key", tokens, heads, head_dim);
  const TokenRows values = token_rows(py::array::ensure(value_object), "value", tokens, heads, head_dim);
  const int64_t* slot = slots.data();
  for (int64_t t = 0; t < tokens; ++t)
    if (slot[t] >= num_slots)
      throw py::value_error("slot_mapping holds slot " + std::to_string(slot[t]) + ", past the " +
                            std::to_string(num_slots) + "-slot cache");
  if (bfloat16) {
    write(keys, static_cast<uint16_t*>(key_cache.mutable_data()), slot, tokens, heads, head_dim);
    write(values, static_cast<uint16_t*>(value_cache.mutable_data()), slot, tokens, heads, head_dim);
  } else {
    write(keys, static_cast<float*>(key_cache.mutable_data()), slot, tokens, heads, head_dim);
    write(values, static_cast<float*>(value_cache.mutable_data()), slot, tokens, heads, head_dim);
  }
}

}  // namespace

void store_kv_rows(const float* keys, const float* values, int64_t token_stride, void* key_cache, void* value_cache,
                   bool bfloat16_cache, const int64_t* slots, int64_t tokens, int64_t heads, int64_t head_dim) {
  const auto stride = static_cast<py::ssize_t>(token_stride * sizeof(float));
  const auto head_stride = static_cast<py::ssize_t>(head_dim * sizeof(float));
  const TokenRows key_rows{reinterpret_cast<const char*>(keys), stride, head_stride};
  const TokenRows value_rows{reinterpret_cast<const char*>(values), stride, head_stride};
  if (bfloat16_cache) {
    write(key_rows, static_cast<uint16_t*>(key_cache), slots, tokens, heads, head_dim);
    write(value_rows, static_cast<uint16_t*>(value_cache), slots, tokens, heads, head_dim);
  } else {
    write(key_rows, static_cast<float*>(key_cache), slots, tokens, heads, head_dim);
    write(value_rows, static_cast<float*>(value_cache), slots, tokens, heads, head_dim);
  }
}

void register_kv_store(py::module_& m) {
  m.def("store_kv", &store, py::arg("key"), py::arg("value"), py::arg("key_cache"), py::arg("value_cache"),
        py::arg("slot_mapping"),
        "Writes each token's key and value into its cache slot, as vivace.kernels.paged_attention.store_kv, in place.\n"
        "key, value float32 [tokens, heads, head_dim] (strided views allowed, head_dim contiguous); key_cache,\n"
        "value_cache [num_blocks, block_size, heads, head_dim], C-contiguous, float32 or bfloat16 as int16 bits\n"
        "(torch: cache.view(torch.int16); values rounded as Tensor.to(torch.bfloat16) rounds them); slot_mapping\n"
        "int64 [tokens], slot = block * block_size + row; a negative slot (a padding row) is skipped.");
}

}  // namespace vivace
