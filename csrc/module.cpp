#include <pybind11/pybind11.h>

#include "decode_bindings.h"
#include "paged_attention.h"
#include "rvq_schedule.h"
#include "sampler_bindings.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "vivace native core: RVQ token schedules, the token sampler, the decode batch and CPU decode attention";
  vivace::register_rvq_schedule(m);
  vivace::register_sampler(m);
  vivace::register_decode(m);
  vivace::register_paged_attention(m);
}
