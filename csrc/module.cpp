#include <pybind11/pybind11.h>

#include "rvq_schedule.h"
#include "sampler_bindings.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "vivace native core: RVQ token schedules and the token sampler";
  vivace::register_rvq_schedule(m);
  vivace::register_sampler(m);
}
