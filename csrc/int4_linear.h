#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

namespace vivace {

// A linear layer with 4-bit weights in groups: w[n, k] = q[n, k] * scales[n, k / 64], q in [-8, 7], one bfloat16
// scale per output channel and group of 64 inputs (int4_pack). Half the bytes of int8 weights (plus 1/16 for the
// scales), for decode steps that stream every weight once.
//
// The activations are quantized on the fly per row and group of 64 inputs to symmetric int8 (the group's largest
// magnitude over 127 steps), so each group's products sum exactly in int32 (AVX-512 VNNI vpdpbusd, or AVX2
// vpmaddubsw and vpmaddwd, on the weights' unsigned nibbles q + 8, less 8 times the group's activation sum), and
//   out[r, n] = sum_g sum_k(xq[r, k] * q[n, k]) * (scales[n, g] * x_scale[r, g]) (+ bias[n]),
// the groups added in order in float32 with one fused multiply-add each. An output depends on its own row and
// channel only, not on the batch, the threads or the split.
struct Int4Linear {
  const float* x;  // [rows, in_features]
  const uint8_t* packed;  // int4_pack's layout
  const float* bias;  // [out_features] or null
  float* out;  // [rows, out_features]
  int64_t rows, in_features, out_features;
};

constexpr int64_t kInt4Group = 64;  // inputs per scale
constexpr int64_t kInt4Block = 64;  // output channels per packed block (and per work item)
// Bytes per block and group in int4_pack's layout: 64 channels x 64 inputs as nibbles, then 64 bfloat16 scales.
constexpr int64_t kInt4GroupBytes = kInt4Block * kInt4Group / 2 + kInt4Block * 2;

// The instruction sets int4_linear can use on this CPU, fastest first ("avx512_vnni", "avx2"); empty where it has
// neither. Both give the same bits (the same exact sums, the same fused multiply-adds in the same order).
std::vector<std::string> int4_linear_isas();

// Runs on up to `threads` threads; throws std::invalid_argument where the CPU cannot run the isa ("auto": the
// fastest).
void int4_linear(const Int4Linear& problem, int threads, const std::string& isa = "auto");

// Throws ValueError (one line, naming the argument `name`) unless packed is int4_pack's uint8 array for an
// [out_features, in_features] weight (both >= 1).
void check_int4_packed(const pybind11::array& packed, int64_t out_features, int64_t in_features, const std::string& name);

// _C.int4_linear, _C.int4_pack, _C.int4_unpack, _C.int4_linear_isas.
void register_int4_linear(pybind11::module_& m);

}  // namespace vivace
