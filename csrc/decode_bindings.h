#pragma once
#include <pybind11/pybind11.h>

namespace vivace {

// _C.TokenSchedule, _C.SequenceState, _C.DecodeBatch, _C.plan_windows and _C.plan_chunks.
void register_decode(pybind11::module_& m);

}  // namespace vivace
