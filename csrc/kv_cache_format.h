#pragma once
#include <pybind11/numpy.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "numpy_args.h"

// The element formats of a paged KV cache [num_blocks, block_size, heads, row] as the native kernels see it.
// float32 and bfloat16 (its bits as int16: numpy has no bfloat16) rows hold head_dim values. An int8 row holds
// head_dim signed values q and then the row's float32 scale s in its last 4 bytes (row = head_dim + 4): the row is
// q * s, with s = max|x| / 127 and q = x / s rounded to nearest even (vivace.kernels.kv_int8 is the reference).
// Keeping the scale inside the row keeps every cache a single array, read and written by slot like the others.
namespace vivace {

enum class CacheFormat { kFloat32, kBFloat16, kInt8 };

constexpr int64_t kInt8ScaleBytes = 4;

// Elements per (token, head) row of a cache with this format.
inline int64_t cache_row_width(CacheFormat format, int64_t head_dim) {
  return format == CacheFormat::kInt8 ? head_dim + kInt8ScaleBytes : head_dim;
}

// The format of a cache array by its dtype; a one-line error naming the argument for any other dtype.
inline CacheFormat cache_format(const py::array& cache, const std::string& name) {
  if (py::isinstance<py::array_t<float>>(cache)) return CacheFormat::kFloat32;
  if (py::isinstance<py::array_t<int16_t>>(cache)) return CacheFormat::kBFloat16;
  if (py::isinstance<py::array_t<int8_t>>(cache)) return CacheFormat::kInt8;
  throw py::value_error(name + " must have dtype float32, int16 holding bfloat16 bits, or int8 rows with their scale, got " +
                        py::str(cache.dtype()).cast<std::string>());
}

inline const char* cache_format_name(CacheFormat format) {
  switch (format) {
    case CacheFormat::kFloat32: return "float32";
    case CacheFormat::kBFloat16: return "bfloat16";
    default: return "int8";
  }
}

// The scale of an int8 row of head_dim values (its last 4 bytes; any alignment).
inline float int8_row_scale(const int8_t* row, int64_t head_dim) {
  float scale;
  std::memcpy(&scale, row + head_dim, sizeof scale);
  return scale;
}

}  // namespace vivace
