#include <pybind11/pybind11.h>

#include "causal_conv.h"
#include "decode_bindings.h"
#include "decoder_stack.h"
#include "float32_linear.h"
#include "int4_linear.h"
#include "int8_linear.h"
#include "kv_store.h"
#include "paged_attention.h"
#include "rvq_schedule.h"
#include "sampler_bindings.h"
#include "thread_pool.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "vivace native core: RVQ token schedules, the token sampler, the decode batch, CPU decode attention, KV cache writes, int8, int4 and float32 linears, the decoder stack and the codec's causal convolutions";
  vivace::register_rvq_schedule(m);
  vivace::register_sampler(m);
  vivace::register_decode(m);
  vivace::register_paged_attention(m);
  vivace::register_kv_store(m);
  vivace::register_int8_linear(m);
  vivace::register_int4_linear(m);
  vivace::register_float32_linear(m);
  vivace::register_decoder_stack(m);
  vivace::register_causal_conv(m);
  m.def("parallel_backend", [] { return vivace::parallel_on_openmp() ? "openmp" : "threads"; },
        "What the native kernels' threads are: 'openmp' (the OpenMP runtime torch loaded: the same workers as\n"
        "torch's ops) or 'threads' (a pool of vivace's own, where no OpenMP runtime is loaded).");
}
