#pragma once
#include <pybind11/pybind11.h>

namespace vivace {

// _C.DecoderStack: every decoder layer of a stage transformer for one decode step in one call (float32 activations,
// int8 or float32 linears, paged self-attention, cross-attention over encoder states), so that a step costs the kernels'
// time and not a Python call and a dozen small tensor ops per layer.
void register_decoder_stack(pybind11::module_& m);

}  // namespace vivace
