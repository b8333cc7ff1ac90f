#pragma once
#include <pybind11/pybind11.h>

namespace vivace {

namespace py = pybind11;

// _C.causal_conv1d: the streaming SoundStream decoder's convolutions with their ELU and residual add fused.
void register_causal_conv(py::module_& m);

}  // namespace vivace
