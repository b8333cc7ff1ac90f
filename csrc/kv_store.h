#pragma once
#include <pybind11/pybind11.h>

namespace vivace {

// _C.store_kv: each token's key and value into its slot of a paged float32 or bfloat16 cache.
void register_kv_store(pybind11::module_& m);

}  // namespace vivace
