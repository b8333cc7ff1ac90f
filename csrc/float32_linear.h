#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>

namespace vivace {

// out[r, n] = sum_k x[r, k] * weight[n, k] (+ bias[n]) in float32: a linear layer over a few rows (decode steps),
// weights [out_features, in_features] row-major as torch stores them, float32 or bfloat16 (widened exactly as they
// are read: half the bytes, the activations and sums still float32), read from memory once per call whatever the
// row count. Each output is summed in one fixed order (sixteen lanes of fused multiply-adds over k, then a fixed
// tree), so it depends on its own row and channel only: not on the other rows, the threads or the split.
struct Float32Linear {
  const float* x;  // [rows, in_features]
  const float* weight;  // [out_features, in_features], or null where weight_bf16 holds the weights
  const float* bias;  // [out_features] or null
  float* out;  // [rows, out_features]
  int64_t rows, in_features, out_features;
  const uint16_t* weight_bf16 = nullptr;  // [out_features, in_features] bfloat16 bits, where weight is null
};

// Whether this CPU runs the AVX-512 form (float32_linear runs a portable one elsewhere, much slower than torch's
// F.linear: callers keep torch there).
bool float32_linear_fast();

// Runs on up to `threads` threads (vivace::parallel_for); portable: the portable form even where AVX-512 runs (the
// same bits, slower: for tests).
void float32_linear(const Float32Linear& problem, int threads, bool portable = false);

// _C.float32_linear, _C.bfloat16_weight_linear, _C.float32_linear_fast.
void register_float32_linear(pybind11::module_& m);

}  // namespace vivace
