#pragma once
#include <pybind11/pybind11.h>

namespace vivace {

// _C.sample and _C.sample_guided.
void register_sampler(pybind11::module_& m);

}  // namespace vivace
