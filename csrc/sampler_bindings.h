#pragma once
#include <pybind11/pybind11.h>

#include "torch_numerics.h"

namespace vivace {

// The float64 kernels torch runs on this CPU (they decide the reference's rounding); asked once, with the GIL held.
const TorchNumerics& torch_numerics();

// _C.sample and _C.sample_guided.
void register_sampler(pybind11::module_& m);

}  // namespace vivace
