#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>

#include "kv_cache_format.h"

namespace vivace {

// Each token's key and value rows ([heads, head_dim] floats from keys + t * token_stride, likewise values) into
// its slot of a paged cache [num_blocks, block_size, heads, row]: float32, bfloat16 bits rounded as
// Tensor.to(torch.bfloat16) rounds, or int8 rows with their scale (kv_cache_format.h); a negative slot (a padding
// row) is skipped. Slots are not checked here.
void store_kv_rows(const float* keys, const float* values, int64_t token_stride, void* key_cache, void* value_cache,
                   CacheFormat format, const int64_t* slots, int64_t tokens, int64_t heads, int64_t head_dim);

// _C.store_kv: each token's key and value into its slot of a paged float32, bfloat16 or int8 cache.
void register_kv_store(pybind11::module_& m);

}  // namespace vivace
