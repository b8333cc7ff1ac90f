#include "rvq_schedule.h"

#include <stdexcept>
#include <string>

namespace vivace {

IdArray flatten_time_major(IdArray codes, int64_t codebook_size, int64_t offset) {
  if (codes.ndim() != 2) throw std::invalid_argument("codes must be [frames, levels]");
  const int64_t frames = codes.shape(0), levels = codes.shape(1);
  IdArray tokens(frames * levels);
  auto in = codes.unchecked<2>();
  auto out = tokens.mutable_unchecked<1>();
  for (int64_t t = 0; t < frames; ++t) {
    for (int64_t l = 0; l < levels; ++l) {
      const int64_t code = in(t, l);
      if (code < 0 || code >= codebook_size)
        throw std::invalid_argument("code " + std::to_string(code) + " at frame " + std::to_string(t) +
                                    ", level " + std::to_string(l) + " is outside [0, " +
                                    std::to_string(codebook_size) + ")");
      out(t * levels + l) = offset + l * codebook_size + code;
    }
  }
  return tokens;
}

IdArray unflatten_time_major(IdArray tokens, int64_t num_levels, int64_t codebook_size, int64_t offset) {
  if (tokens.ndim() != 1) throw std::invalid_argument("tokens must be one-dimensional");
  const int64_t n = tokens.shape(0);
  if (num_levels <= 0 || n % num_levels)
    throw std::invalid_argument(std::to_string(n) + " tokens do not split into frames of " +
                                std::to_string(num_levels) + " levels");
  const int64_t frames = n / num_levels;
  IdArray codes({frames, num_levels});
  auto in = tokens.unchecked<1>();
  auto out = codes.mutable_unchecked<2>();
  for (int64_t t = 0; t < frames; ++t) {
    for (int64_t l = 0; l < num_levels; ++l) {
      const int64_t code = in(t * num_levels + l) - offset - l * codebook_size;
      if (code < 0 || code >= codebook_size)
        throw std::invalid_argument("token " + std::to_string(in(t * num_levels + l)) + " at step " +
                                    std::to_string(t * num_levels + l) + " is not a level-" +
                                    std::to_string(l) + " token");
      out(t, l) = code;
    }
  }
  return codes;
}

IdArray level_windows(int64_t start, int64_t count, int64_t num_levels, int64_t codebook_size) {
  if (start < 0 || count < 0 || num_levels <= 0) throw std::invalid_argument("bad schedule range");
  IdArray windows({count, int64_t{2}});
  auto out = windows.mutable_unchecked<2>();
  for (int64_t i = 0; i < count; ++i) {
    const int64_t level = (start + i) % num_levels;
    out(i, 0) = level * codebook_size;
    out(i, 1) = (level + 1) * codebook_size;
  }
  return windows;
}

IdArray delay_pattern(IdArray codes, int64_t pad_id) {
  if (codes.ndim() != 2) throw std::invalid_argument("codes must be [codebooks, steps]");
  const int64_t books = codes.shape(0), steps = codes.shape(1);
  if (books == 0) throw std::invalid_argument("codes must have at least one codebook");
  const int64_t width = steps + books - 1;
  IdArray delayed({books, width});
  auto in = codes.unchecked<2>();
  auto out = delayed.mutable_unchecked<2>();
  for (int64_t k = 0; k < books; ++k) {
    for (int64_t s = 0; s < width; ++s) {
      const int64_t t = s - k;
      out(k, s) = (t >= 0 && t < steps) ? in(k, t) : pad_id;
    }
  }
  return delayed;
}

IdArray undelay_pattern(IdArray delayed) {
  if (delayed.ndim() != 2) throw std::invalid_argument("delayed must be [codebooks, steps + codebooks - 1]");
  const int64_t books = delayed.shape(0), width = delayed.shape(1);
  if (books == 0) throw std::invalid_argument("delayed must have at least one codebook");
  if (width < books - 1)
    throw std::invalid_argument(std::to_string(width) + " delayed steps are fewer than the " +
                                std::to_string(books - 1) + " a " + std::to_string(books) +
                                "-codebook delay pattern adds");
  const int64_t steps = width - books + 1;
  IdArray codes({books, steps});
  auto in = delayed.unchecked<2>();
  auto out = codes.mutable_unchecked<2>();
  for (int64_t k = 0; k < books; ++k)
    for (int64_t t = 0; t < steps; ++t) out(k, t) = in(k, t + k);
  return codes;
}

void register_rvq_schedule(py::module_& m) {
  m.def("flatten_time_major", &flatten_time_major, py::arg("codes"), py::arg("codebook_size"),
        py::arg("offset") = 0, "RVQ codes [frames, levels] -> time-major tokens with per-level offsets.");
  m.def("unflatten_time_major", &unflatten_time_major, py::arg("tokens"), py::arg("num_levels"),
        py::arg("codebook_size"), py::arg("offset") = 0, "Inverse of flatten_time_major.");
  m.def("level_windows", &level_windows, py::arg("start"), py::arg("count"), py::arg("num_levels"),
        py::arg("codebook_size"), "Output-vocabulary window [lo, hi) for each step of a time-major stream.");
  m.def("delay_pattern", &delay_pattern, py::arg("codes"), py::arg("pad_id"),
        "MusicGen delay pattern: codes [K, T] -> [K, T + K - 1], codebook k shifted right by k, pad_id elsewhere.");
  m.def("undelay_pattern", &undelay_pattern, py::arg("delayed"),
        "Inverse of delay_pattern: [K, T + K - 1] -> [K, T].");
}

}  // namespace vivace
