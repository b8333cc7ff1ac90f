#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>

namespace vivace {

namespace py = pybind11;
using IdArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

// Time-major flattening of RVQ codes [frames, levels] into one token stream with per-level offsets:
// token = offset + level * codebook_size + code, frame 0 levels 0..L-1 first.
IdArray flatten_time_major(IdArray codes, int64_t codebook_size, int64_t offset);

// Inverse of flatten_time_major; every token must lie in its level's window.
IdArray unflatten_time_major(IdArray tokens, int64_t num_levels, int64_t codebook_size, int64_t offset);

// Output-vocabulary window [lo, hi) of steps start..start+count-1 of a time-major stream:
// step t targets level t % num_levels. Returns an array [count, 2].
IdArray level_windows(int64_t start, int64_t count, int64_t num_levels, int64_t codebook_size);

// MusicGen delay pattern: codes [K, T] -> [K, T + K - 1] where codebook k starts at step k, i.e.
// out[k, t + k] = codes[k, t]; steps before the start and after the end of a codebook hold pad_id.
IdArray delay_pattern(IdArray codes, int64_t pad_id);

// Inverse of delay_pattern: delayed [K, S] -> [K, S - K + 1] with out[k, t] = delayed[k, t + k].
IdArray undelay_pattern(IdArray delayed);

void register_rvq_schedule(py::module_& m);

}  // namespace vivace
