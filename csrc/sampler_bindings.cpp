#include "sampler_bindings.h"

#include <pybind11/numpy.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "row_kernels.h"
#include "sampler.h"

namespace vivace {
namespace {

namespace py = pybind11;
template <class T>
using Column = py::array_t<T, py::array::c_style>;

std::string shape_of(const py::array& array) {
  std::string text = "(";
  for (py::ssize_t d = 0; d < array.ndim(); ++d) text += (d ? ", " : "") + std::to_string(array.shape(d));
  return text + (array.ndim() == 1 ? ",)" : ")");
}

template <class T>
Column<T> typed_array(py::handle object, const std::string& name, const char* dtype) {
  py::array array = py::array::ensure(object);
  if (!array) throw py::value_error(name + " must be a numpy array or a CPU tensor");
  if (!py::isinstance<py::array_t<T>>(array))
    throw py::value_error(name + " must have dtype " + dtype + ", got " + py::str(array.dtype()).cast<std::string>());
  return Column<T>::ensure(array);
}

template <class T>
Column<T> row_column(py::handle object, const char* name, const char* dtype, int64_t rows) {
  Column<T> column = typed_array<T>(object, name, dtype);
  if (column.ndim() != 1 || column.shape(0) != rows)
    throw py::value_error(std::string(name) + " must have shape (" + std::to_string(rows) + ",), one entry per row, got " +
                          shape_of(column));
  return column;
}

Column<float> logit_matrix(py::handle object, const char* name) {
  Column<float> logits = typed_array<float>(object, name, "float32");
  if (logits.ndim() != 2 || logits.shape(1) == 0)
    throw py::value_error(std::string(name) + " must be [rows, vocab] with vocab >= 1, got shape " + shape_of(logits));
  return logits;
}

TorchNumerics numerics_for(const std::string& capability) {
  if (capability == "AVX512") return {8, 4, true};
  if (capability == "AVX2") return {4, 4, true};
  return {4, 4, false};
}

std::string guess_capability() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    return "AVX512";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "AVX2";
#endif
  return "DEFAULT";
}

TorchNumerics probe_torch_numerics() {
  std::string capability;
  try {
    capability = py::module_::import("torch.backends.cpu").attr("get_cpu_capability")().cast<std::string>();
  } catch (const py::error_already_set&) {
    capability = guess_capability();
  }
  return numerics_for(capability);
}

struct RowColumns {
  Column<double> temperature, top_p;
  Column<int64_t> top_k, vocab_lo, vocab_hi;
  Column<uint64_t> seed, stream, step;
};

std::vector<SamplingParams> row_params(const RowColumns& c, int64_t rows, int64_t vocab) {
  std::vector<SamplingParams> params(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const double t = c.temperature.data()[r];
    if (!(t >= 0.0) || std::isinf(t))
      throw py::value_error("temperature[" + std::to_string(r) + "] = " + std::to_string(t) +
                            " must be finite and >= 0");
    params[r] = {t, c.top_k.data()[r], c.top_p.data()[r], c.vocab_lo.data()[r], c.vocab_hi.data()[r],
                 c.seed.data()[r], c.stream.data()[r], c.step.data()[r]};
    if (!clip_window(params[r], vocab))
      throw py::value_error(describe_empty_window("row " + std::to_string(r), c.vocab_lo.data()[r], c.vocab_hi.data()[r], vocab));
  }
  return params;
}

// fill(r, x, lo, hi) writes row r's float64 logits into x[lo, hi).
template <class Fill>
py::array_t<int64_t> run(const char* what, int64_t rows, int64_t vocab, const RowColumns& columns, int num_threads,
                         const Fill& fill) {
  if (num_threads < 0) throw py::value_error("num_threads must be >= 0 (0 = one per hardware thread)");
  const std::vector<SamplingParams> params = row_params(columns, rows, vocab);
  const TorchNumerics& numerics = torch_numerics();
  const int threads = sampling_threads(num_threads, rows, vocab);

  py::array_t<int64_t> tokens(rows);
  int64_t* out = tokens.mutable_data();
  RowError error = RowError::none;
  int64_t bad;
  {
    py::gil_scoped_release release;
    bad = sample_rows(params, vocab, numerics, threads, [&](int64_t r, double* x) {
      fill(r, x, params[r].vocab_lo, params[r].vocab_hi);
    }, out, &error);
  }
  if (bad >= 0)
    throw py::value_error(describe_row_error(std::string(what) + " row " + std::to_string(bad), params[bad], error));
  return tokens;
}

RowColumns row_columns(int64_t rows, py::handle temperature, py::handle top_k, py::handle top_p, py::handle vocab_lo,
                       py::handle vocab_hi, py::handle seed, py::handle stream, py::handle step) {
  return {row_column<double>(temperature, "temperature", "float64", rows),
          row_column<double>(top_p, "top_p", "float64", rows),
          row_column<int64_t>(top_k, "top_k", "int64", rows),
          row_column<int64_t>(vocab_lo, "vocab_lo", "int64", rows),
          row_column<int64_t>(vocab_hi, "vocab_hi", "int64", rows),
          row_column<uint64_t>(seed, "seed", "uint64", rows),
          row_column<uint64_t>(stream, "stream", "uint64", rows),
          row_column<uint64_t>(step, "step", "uint64", rows)};
}

py::array_t<int64_t> sample(py::handle logits, py::handle temperature, py::handle top_k, py::handle top_p,
                            py::handle vocab_lo, py::handle vocab_hi, py::handle seed, py::handle stream,
                            py::handle step, int num_threads) {
  const Column<float> x = logit_matrix(logits, "logits");
  const int64_t rows = x.shape(0), vocab = x.shape(1);
  const RowColumns columns = row_columns(rows, temperature, top_k, top_p, vocab_lo, vocab_hi, seed, stream, step);
  const float* data = x.data();
  return run("logits", rows, vocab, columns, num_threads, [&](int64_t r, double* row, int64_t lo, int64_t hi) {
    widen(data + r * vocab + lo, hi - lo, row + lo);
  });
}

py::array_t<int64_t> sample_guided(py::handle cond_logits, py::handle uncond_logits, py::handle guidance_scale,
                                   py::handle temperature, py::handle top_k, py::handle top_p, py::handle vocab_lo,
                                   py::handle vocab_hi, py::handle seed, py::handle stream, py::handle step,
                                   int num_threads) {
  const Column<float> cond = logit_matrix(cond_logits, "cond_logits");
  const Column<float> uncond = logit_matrix(uncond_logits, "uncond_logits");
  if (cond.shape(0) != uncond.shape(0) || cond.shape(1) != uncond.shape(1))
    throw py::value_error("cond_logits " + shape_of(cond) + " and uncond_logits " + shape_of(uncond) +
                          " must have the same shape");
  const int64_t rows = cond.shape(0), vocab = cond.shape(1);
  const Column<double> scale = row_column<double>(guidance_scale, "guidance_scale", "float64", rows);
  const RowColumns columns = row_columns(rows, temperature, top_k, top_p, vocab_lo, vocab_hi, seed, stream, step);
  const float *c = cond.data(), *u = uncond.data();
  const double* s = scale.data();
  return run("guided logits", rows, vocab, columns, num_threads, [&](int64_t r, double* row, int64_t lo, int64_t hi) {
    guide(c + r * vocab + lo, u + r * vocab + lo, hi - lo, s[r], row + lo);
  });
}

}  // namespace

const TorchNumerics& torch_numerics() {
  static const TorchNumerics numerics = probe_torch_numerics();
  return numerics;
}

void register_sampler(py::module_& m) {
  m.def("sample", &sample, py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
        py::arg("vocab_lo"), py::arg("vocab_hi"), py::arg("seed"), py::arg("stream"), py::arg("step"),
        py::arg("num_threads") = 0,
        "One token per row of float32 logits [rows, vocab], token for token what vivace.sampling.sample draws.\n"
        "Per-row arrays: temperature float64 (0 = greedy), top_k int64 (0 = off), top_p float64 (1 = off),\n"
        "vocab_lo/vocab_hi int64 (allowed window), seed/stream/step uint64 (the counter-based draw).\n"
        "num_threads 0 = one per hardware thread, capped by rows. Returns int64 [rows].");
  m.def("sample_guided", &sample_guided, py::arg("cond_logits"), py::arg("uncond_logits"), py::arg("guidance_scale"),
        py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("vocab_lo"), py::arg("vocab_hi"),
        py::arg("seed"), py::arg("stream"), py::arg("step"), py::arg("num_threads") = 0,
        "Classifier-free guidance: samples, per pair row, the float64 logits\n"
        "uncond + guidance_scale * (cond - uncond) exactly as sample() samples a row.");
}

}  // namespace vivace
