#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

namespace vivace {

// out[r, n] = x_scale[r] * scales[n] * sum_k (xq[r, k] - x_zero[r]) * weight[n, k] (+ bias[n]): an int8 linear
// layer whose float32 activations are quantized per row on the fly (asymmetric uint8: the row's range, zero
// included, over 255 steps) and multiplied with the int8 weights in exact int32 sums (AVX-512 VNNI vpdpbusd, or
// AVX2 vpmaddwd on values widened to int16).
// Weights are int8 [out_features, in_features], row-major as quantized; the VNNI kernel reads them packed
// (_C.int8_vnni_pack: 16 channels x 4 inputs per 64 bytes), packed once by the caller or else per call.
// weight_sums[n] = sum_k weight[n, k] takes the activations' zero point out of the int32 sums.
struct Int8Linear {
  const float* x;  // [rows, in_features]
  const int8_t* weight;  // [out_features, in_features]
  const float* scales;  // [out_features]
  const int32_t* weight_sums;  // [out_features]
  const float* bias;  // [out_features] or null
  float* out;  // [rows, out_features]
  int64_t rows, in_features, out_features;
  const int8_t* vnni_weight = nullptr;  // the weights as _C.int8_vnni_pack lays them out, or null (AVX-512 VNNI only)
};

// The instruction sets int8_linear can use on this CPU, fastest first ("avx512_vnni", "avx2"); empty where it has
// neither (the Python side then keeps torch's int8 path). Every one gives the same bits: the sums are exact.
std::vector<std::string> int8_linear_isas();

// Runs on up to `threads` threads (vivace::parallel_for); throws std::invalid_argument where the CPU has no
// instruction set for it. Each output depends on its own row and channel only (its sums are exact integers), not
// on the batch, the threads, the split or the instruction set. isa: "auto" (the fastest) or one of
// int8_linear_isas().
void int8_linear(const Int8Linear& problem, int threads, const std::string& isa = "auto");

// _C.int8_linear, _C.int8_linear_isas.
void register_int8_linear(pybind11::module_& m);

}  // namespace vivace
