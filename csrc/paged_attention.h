#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>

#include "kv_cache_format.h"

namespace vivace {

// One decode step (float32 arithmetic) over a paged KV cache (NHD: [num_blocks, block_size, num_heads, row], the row
// as kv_cache_format.h lays it out for the format), with
// the semantics of vivace.kernels.paged_attention.paged_decode_attention. Only the first context_lens[s]
// slots of sequence s are read. distance_bias, when not null, is [num_heads, bias_width].
struct PagedDecode {
  const float* query;  // [num_seqs, num_heads, head_dim]
  const void* key_cache;  // float32, bfloat16 bits (uint16) or int8 rows with their scale, as cache_format says
  const void* value_cache;
  CacheFormat cache_format;
  const int32_t* block_tables;  // [num_seqs, max_blocks]
  const int32_t* context_lens;  // [num_seqs], each in [1, max_blocks * block_size]
  const float* distance_bias;
  float* out;  // [num_seqs, num_heads, head_dim]
  int64_t num_seqs, num_heads, head_dim, block_size, max_blocks, bias_width;
  float scale;
};

enum class AttentionIsa { kAuto, kPortable };

// Whether this CPU runs the AVX-512 kernel for this head_dim (AttentionIsa::kAuto picks it then).
bool avx512_attention_supported(int64_t head_dim);

// How many of `wanted` threads (0: one per hardware thread) pay for themselves on `floats` cached key and value
// floats read (2 * sum of context_lens * num_heads * head_dim).
int decode_attention_threads(int64_t floats, int wanted);

// Runs every (sequence, head) on up to `threads` threads; each output row depends only on its own inputs, not on
// the batch or `threads`. Lengths and block ids are not checked here (the binding checks them). Throws
// std::bad_alloc if its scratch cannot grow.
void paged_decode_attention(const PagedDecode& problem, int threads, AttentionIsa isa = AttentionIsa::kAuto);

// The optional T5 distance_bias argument, float32 [num_heads, max_distance + 1], checked (empty where None).
pybind11::array_t<float, pybind11::array::c_style> distance_bias_argument(const pybind11::object& object,
                                                                          int64_t num_heads);

// _C.paged_decode_attention.
void register_paged_attention(pybind11::module_& m);

}  // namespace vivace
