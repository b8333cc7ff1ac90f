#pragma once
#include <pybind11/numpy.h>

#include <string>

// Checked numpy arguments of the native kernels: one-line errors that name the argument.
namespace vivace {

namespace py = pybind11;

inline std::string shape_of(const py::array& array) {
  std::string text = "(";
  for (py::ssize_t d = 0; d < array.ndim(); ++d) text += (d ? ", " : "") + std::to_string(array.shape(d));
  return text + (array.ndim() == 1 ? ",)" : ")");
}

// A C-contiguous view of object with dtype T and ndim dimensions; with copy, a strided input may be copied into
// one (small inputs), without, it must already be C-contiguous (caches, weights: never copied).
template <class T>
py::array_t<T, py::array::c_style> typed_array(py::handle object, const char* name, const char* dtype, int ndim,
                                               bool copy) {
  py::array array = py::array::ensure(object);
  if (!array) throw py::value_error(std::string(name) + " must be a numpy array or a CPU tensor");
  if (!py::isinstance<py::array_t<T>>(array))
    throw py::value_error(std::string(name) + " must have dtype " + dtype + ", got " +
                          py::str(array.dtype()).cast<std::string>());
  if (array.ndim() != ndim)
    throw py::value_error(std::string(name) + " must have " + std::to_string(ndim) + " dimensions, got shape " +
                          shape_of(array));
  if (!copy && !(array.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + " must be C-contiguous (it is not copied)");
  return py::array_t<T, py::array::c_style>::ensure(array);
}

// A linear layer's weight [out, in] must have one column per column of x [rows, in].
inline void check_weight_columns(const py::array& weight, const py::array& x) {
  if (weight.shape(1) != x.shape(1))
    throw py::value_error("weight " + shape_of(weight) + " must have " + std::to_string(x.shape(1)) +
                          " columns, one per column of x " + shape_of(x));
}

// Per-channel arrays (scales, sums, bias) hold one value per weight row.
inline void check_per_channel(const py::array& array, const char* name, int64_t out_features) {
  if (array.shape(0) != out_features)
    throw py::value_error(std::string(name) + " " + shape_of(array) + " must have one value per weight row (" +
                          std::to_string(out_features) + ")");
}

// An optional float32 [out_features] bias: an empty array where object is None (callers pass nullptr for it then).
inline py::array_t<float, py::array::c_style> optional_bias(const py::object& object, int64_t out_features) {
  py::array_t<float, py::array::c_style> bias;
  if (object.is_none()) return bias;
  bias = typed_array<float>(object, "bias", "float32", 1, true);
  check_per_channel(bias, "bias", out_features);
  return bias;
}

}  // namespace vivace
