#include "decode_bindings.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "decode_batch.h"
#include "sampler_bindings.h"
#include "window_plan.h"

namespace vivace {
namespace {

namespace py = pybind11;
template <class T>
using Array = py::array_t<T, py::array::c_style>;

template <class T>
Array<T> checked(py::handle object, const std::string& name, const char* dtype, int ndim) {
  py::array array = py::array::ensure(object);
  if (!array || !py::isinstance<py::array_t<T>>(array))
    throw py::value_error(name + " must be a " + dtype + " numpy array or CPU tensor");
  if (array.ndim() != ndim) throw py::value_error(name + " must have " + std::to_string(ndim) + " dimensions");
  return Array<T>::ensure(array);
}

template <class T>
Array<T> group_column(py::handle object, const char* name, const char* dtype, int64_t groups) {
  Array<T> column = checked<T>(object, name, dtype, 1);
  if (column.shape(0) != groups)
    throw py::value_error(std::string(name) + " must have one entry per group (" + std::to_string(groups) + ")");
  return column;
}

Array<int64_t> windows_of(const TokenSchedule& schedule, int64_t new_index) {
  Array<int64_t> out({schedule.num_heads(), int64_t{2}});
  for (int64_t h = 0; h < schedule.num_heads(); ++h) {
    const auto [lo, hi] = schedule.window(new_index, h);
    out.mutable_at(h, 0) = lo;
    out.mutable_at(h, 1) = hi;
  }
  return out;
}

Array<int64_t> drawn_row(const TokenSchedule& schedule, py::handle drawn) {
  Array<int64_t> ids = checked<int64_t>(drawn, "drawn", "int64", 1);
  if (ids.shape(0) != schedule.num_heads())
    throw py::value_error("drawn must hold one id per head (" + std::to_string(schedule.num_heads()) + ")");
  return ids;
}

std::shared_ptr<SequenceState> make_state(std::shared_ptr<TokenSchedule> schedule, py::handle prompt, int64_t max_len) {
  Array<int64_t> rows = checked<int64_t>(prompt, "prompt", "int64", 2);
  if (rows.shape(1) != schedule->num_codebooks())
    throw py::value_error("prompt rows hold " + std::to_string(rows.shape(1)) + " ids; the schedule reads " +
                          std::to_string(schedule->num_codebooks()));
  return std::make_shared<SequenceState>(rows.data(), rows.shape(0), max_len, std::move(schedule));
}

Array<int64_t> rows_of(const SequenceState& state, int64_t begin) {
  const int64_t k = state.num_codebooks();
  Array<int64_t> out({state.length() - begin, k});
  std::copy(state.row(begin), state.row(state.length()), out.mutable_data());
  return out;
}

Array<int64_t> outputs_of(const SequenceState& state) {
  Array<int64_t> rows = rows_of(state, state.prompt_len());
  int64_t* data = rows.mutable_data();
  for (py::ssize_t i = 0; i < rows.size(); ++i) data[i] = state.schedule().output_of(data[i]);
  if (!state.schedule().is_delay()) return rows.reshape({rows.shape(0)});
  return rows;
}

Array<int64_t> spans(const std::vector<WindowSpan>& windows) {
  Array<int64_t> out({static_cast<int64_t>(windows.size()), int64_t{5}});
  for (size_t i = 0; i < windows.size(); ++i) {
    const WindowSpan& w = windows[i];
    const int64_t row[5] = {w.index, w.prefix_start, w.new_start, w.new_end, w.segment};
    std::copy(row, row + 5, out.mutable_data() + i * 5);
  }
  return out;
}

// DecodeBatch with its step-input arrays, allocated once and refilled by every prepare().
class PyDecodeBatch {
 public:
  PyDecodeBatch(int64_t block_size, const std::vector<std::vector<std::shared_ptr<SequenceState>>>& groups,
                py::handle temperature, py::handle top_k, py::handle top_p, py::handle seed, py::handle stream,
                py::handle guidance_scale)
      : batch_(block_size, groups, sampling_of(groups.size(), temperature, top_k, top_p, seed, stream, guidance_scale)),
        input_ids_({batch_.num_members(), batch_.num_codebooks()}),
        positions_(batch_.num_members()),
        slot_mapping_(batch_.num_members()),
        block_tables_({batch_.num_members(), batch_.table_width()}),
        context_lens_(batch_.num_members()) {}

  DecodeBatch& batch() { return batch_; }

  Array<int64_t> missing_blocks() const {
    Array<int64_t> out(batch_.num_groups());
    batch_.missing_blocks(out.mutable_data());
    return out;
  }

  py::tuple prepare() {
    batch_.prepare({input_ids_.mutable_data(), positions_.mutable_data(), slot_mapping_.mutable_data(),
                    block_tables_.mutable_data(), context_lens_.mutable_data()});
    return py::make_tuple(input_ids_, positions_, slot_mapping_, block_tables_, context_lens_);
  }

  py::dict sampling_rows() const {
    const std::vector<SamplingParams> rows = batch_.sampling_rows();
    const int64_t n = static_cast<int64_t>(rows.size());
    Array<double> temperature(n), top_p(n);
    Array<int64_t> top_k(n), lo(n), hi(n);
    Array<uint64_t> seed(n), stream(n), step(n);
    for (int64_t r = 0; r < n; ++r) {
      const SamplingParams& p = rows[r];
      temperature.mutable_at(r) = p.temperature;
      top_k.mutable_at(r) = p.top_k;
      top_p.mutable_at(r) = p.top_p;
      lo.mutable_at(r) = p.vocab_lo;
      hi.mutable_at(r) = p.vocab_hi;
      seed.mutable_at(r) = p.seed;
      stream.mutable_at(r) = p.stream;
      step.mutable_at(r) = p.step;
    }
    py::dict out;
    out["temperature"] = temperature;
    out["top_k"] = top_k;
    out["top_p"] = top_p;
    out["vocab_lo"] = lo;
    out["vocab_hi"] = hi;
    out["seed"] = seed;
    out["stream"] = stream;
    out["step"] = step;
    return out;
  }

  py::tuple guidance() const {
    const int64_t n = batch_.num_groups();
    Array<int64_t> lead(n), null(n);
    Array<double> scale(n);
    for (int64_t g = 0; g < n; ++g) {
      lead.mutable_at(g) = batch_.first_member(g);
      null.mutable_at(g) = batch_.group_size(g) == 2 ? batch_.first_member(g) + 1 : -1;
      scale.mutable_at(g) = batch_.guidance_scale(g);
    }
    return py::make_tuple(lead, null, scale);
  }

  py::dict plan_steps(int64_t steps) const {
    const DecodeBatch::StepPlan plan = batch_.plan_steps(steps);
    const int64_t rows = batch_.num_groups() * batch_.num_heads();
    const int64_t g = batch_.num_groups(), k = batch_.num_codebooks();
    auto filled = [](const auto& values, std::vector<py::ssize_t> shape) {
      using T = typename std::decay_t<decltype(values)>::value_type;
      Array<T> out(shape);
      std::copy(values.begin(), values.end(), out.mutable_data());
      return out;
    };
    py::dict out;
    out["vocab_lo"] = filled(plan.vocab_lo, {steps, rows});
    out["vocab_hi"] = filled(plan.vocab_hi, {steps, rows});
    out["step"] = filled(plan.step, {steps, rows});
    out["forced"] = filled(plan.forced, {steps, g, k});
    out["offset"] = filled(plan.offset, {g, k});
    return out;
  }

  Array<int64_t> advance(py::handle drawn) {
    Array<int64_t> ids = checked<int64_t>(drawn, "drawn", "int64", 2);
    if (ids.shape(0) != batch_.num_groups() || ids.shape(1) != batch_.num_heads())
      throw py::value_error("drawn must be [groups, heads] = [" + std::to_string(batch_.num_groups()) + ", " +
                            std::to_string(batch_.num_heads()) + "]");
    return as_array(batch_.advance(ids.data()));
  }

  Array<int64_t> sample_and_advance(py::handle logits, int num_threads) {
    if (num_threads < 0) throw py::value_error("num_threads must be >= 0 (0 = one per hardware thread)");
    Array<float> x = checked<float>(logits, "logits", "float32", 3);
    if (x.shape(0) != batch_.num_members() || x.shape(1) != batch_.num_heads() || x.shape(2) == 0)
      throw py::value_error("logits must be [members, heads, vocab] with " + std::to_string(batch_.num_members()) +
                            " members and " + std::to_string(batch_.num_heads()) + " heads");
    const TorchNumerics& numerics = torch_numerics();
    std::vector<int64_t> drawn(batch_.num_groups() * batch_.num_heads());
    std::string error;
    bool ok;
    {
      py::gil_scoped_release release;
      ok = batch_.sample(x.data(), x.shape(2), numerics, num_threads, drawn.data(), &error);
    }
    if (!ok) throw py::value_error(error);
    return as_array(batch_.advance(drawn.data()));
  }

 private:
  static std::vector<GroupSampling> sampling_of(size_t groups, py::handle temperature, py::handle top_k,
                                                py::handle top_p, py::handle seed, py::handle stream,
                                                py::handle guidance_scale) {
    const int64_t n = static_cast<int64_t>(groups);
    auto t = group_column<double>(temperature, "temperature", "float64", n);
    auto k = group_column<int64_t>(top_k, "top_k", "int64", n);
    auto p = group_column<double>(top_p, "top_p", "float64", n);
    auto s = group_column<uint64_t>(seed, "seed", "uint64", n);
    auto r = group_column<uint64_t>(stream, "stream", "uint64", n);
    auto g = group_column<double>(guidance_scale, "guidance_scale", "float64", n);
    std::vector<GroupSampling> out(groups);
    for (int64_t i = 0; i < n; ++i) {
      if (!(t.at(i) >= 0.0) || std::isinf(t.at(i)))
        throw py::value_error("temperature of group " + std::to_string(i) + " must be finite and >= 0");
      out[i] = {t.at(i), k.at(i), p.at(i), s.at(i), r.at(i), g.at(i)};
    }
    return out;
  }

  static Array<int64_t> as_array(const std::vector<int64_t>& values) {
    Array<int64_t> out(static_cast<int64_t>(values.size()));
    std::copy(values.begin(), values.end(), out.mutable_data());
    return out;
  }

  DecodeBatch batch_;
  Array<int64_t> input_ids_, positions_, slot_mapping_;
  Array<int32_t> block_tables_, context_lens_;
};

}  // namespace

void register_decode(py::module_& m) {
  py::class_<TokenSchedule, std::shared_ptr<TokenSchedule>>(m, "TokenSchedule",
      "Which vocabulary window each head draws from at a generated step, and what the drawn ids become as the next "
      "input row: time-major RVQ levels (MusicLM) or a delay-pattern grid (MusicGen).")
      .def_static("time_major", [](int64_t num_levels, int64_t codebook_size, int64_t input_offset, int64_t first_level) {
            return std::make_shared<TokenSchedule>(TokenSchedule::time_major(num_levels, codebook_size, input_offset, first_level));
          }, py::arg("num_levels"), py::arg("codebook_size"), py::arg("input_offset") = 0, py::arg("first_level") = 0,
          "Step t draws level (first_level + t) % num_levels from [level * codebook_size, (level + 1) * codebook_size);\n"
          "drawn id o becomes input id input_offset + o.")
      .def_static("delay", [](py::handle grid, int64_t first, int64_t vocab_size) {
            Array<int64_t> g = checked<int64_t>(grid, "grid", "int64", 2);
            std::vector<int64_t> values(g.data(), g.data() + g.size());
            return std::make_shared<TokenSchedule>(TokenSchedule::delay(std::move(values), g.shape(0), first, vocab_size));
          }, py::arg("grid"), py::arg("first"), py::arg("vocab_size"),
          "grid [K, positions]: the id each position must take (-1: the drawn one); step t fills position first + t;\n"
          "every head draws from [0, vocab_size).")
      .def_property_readonly("num_heads", &TokenSchedule::num_heads)
      .def_property_readonly("is_delay", &TokenSchedule::is_delay)
      .def_property_readonly("max_steps", &TokenSchedule::max_steps)
      .def("windows", [](const TokenSchedule& s, int64_t new_index) { return windows_of(s, new_index); },
           py::arg("new_index"), "Allowed window [lo, hi) of each head at the new_index-th step: int64 [heads, 2].")
      .def("input_row", [](const TokenSchedule& s, int64_t new_index, py::handle drawn) {
            Array<int64_t> ids = drawn_row(s, drawn);
            Array<int64_t> row(s.num_codebooks());
            s.input_row(new_index, ids.data(), row.mutable_data());
            return row;
          }, py::arg("new_index"), py::arg("drawn"), "The input row that drawn ids (one per head) become.");

  py::class_<SequenceState, std::shared_ptr<SequenceState>>(m, "SequenceState",
      "One row of a stage: its input rows, how many have keys/values in the cache, and its cache blocks.")
      .def(py::init(&make_state), py::arg("schedule"), py::arg("prompt"), py::arg("max_len"),
           "prompt: int64 [prompt_len, num_codebooks]; the sequence holds at most max_len rows.")
      .def_property_readonly("length", &SequenceState::length)
      .def_property_readonly("prompt_len", &SequenceState::prompt_len)
      .def_property_readonly("max_len", &SequenceState::max_len)
      .def_property_readonly("num_new", &SequenceState::num_new)
      .def_property_readonly("finished", &SequenceState::finished)
      .def_property_readonly("num_codebooks", &SequenceState::num_codebooks)
      .def_readwrite("num_cached", &SequenceState::num_cached)
      .def_property("block_table", [](const SequenceState& s) { return s.block_table; },
                    [](SequenceState& s, std::vector<int32_t> table) { s.block_table = std::move(table); })
      .def("add_block", [](SequenceState& s, int32_t block) { s.block_table.push_back(block); }, py::arg("block"))
      .def("rows", [](const SequenceState& s, int64_t begin) {
            if (begin < 0 || begin > s.length()) throw py::index_error("begin outside the sequence");
            return rows_of(s, begin);
          }, py::arg("begin") = 0, "Input rows [begin, length) as int64 [n, num_codebooks] (a copy).")
      .def("outputs", &outputs_of,
           "What the generated steps recorded: output ids [num_new] (one-head schedules) or rows [num_new, K].")
      .def("append", [](SequenceState& s, py::handle drawn) {
            Array<int64_t> ids = drawn_row(s.schedule(), drawn);
            s.append_drawn(ids.data());
          }, py::arg("drawn"), "Appends the row that drawn ids (one per head) become.");

  py::class_<PyDecodeBatch>(m, "DecodeBatch",
      "The per-step bookkeeping of a stage's decode batch: groups of one sequence or a guided pair (cond, null),\n"
      "each member a row of the forward. A step is prepare() -> forward -> sample_and_advance(logits).")
      .def(py::init<int64_t, const std::vector<std::vector<std::shared_ptr<SequenceState>>>&, py::handle, py::handle,
                    py::handle, py::handle, py::handle, py::handle>(),
           py::arg("block_size"), py::arg("groups"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
           py::arg("seed"), py::arg("stream"), py::arg("guidance_scale"),
           "groups: lists of SequenceState; the per-group columns are numpy arrays (float64 temperature, top_p,\n"
           "guidance_scale; int64 top_k; uint64 seed, stream).")
      .def_property_readonly("num_groups", [](PyDecodeBatch& b) { return b.batch().num_groups(); })
      .def_property_readonly("num_members", [](PyDecodeBatch& b) { return b.batch().num_members(); })
      .def_property_readonly("num_heads", [](PyDecodeBatch& b) { return b.batch().num_heads(); })
      .def_property_readonly("table_width", [](PyDecodeBatch& b) { return b.batch().table_width(); })
      .def("missing_blocks", &PyDecodeBatch::missing_blocks,
           "Cache blocks each group still lacks for every member to store its last row: int64 [groups].")
      .def("prepare", &PyDecodeBatch::prepare,
           "Fills and returns (input_ids [M, K] int64, positions [M] int64, slot_mapping [M] int64,\n"
           "block_tables [M, table_width] int32, context_lens [M] int32): the same arrays every call.")
      .def("sampling_rows", &PyDecodeBatch::sampling_rows,
           "Per (group, head) sampling inputs of this step, for a sampler elsewhere (the GPU's): a dict of arrays.")
      .def_property_readonly("steps_left", [](PyDecodeBatch& b) { return b.batch().steps_left(); })
      .def("plan_steps", &PyDecodeBatch::plan_steps, py::arg("steps"),
           "The next `steps` steps for a device that draws and advances on its own: vocab_lo, vocab_hi, step\n"
           "[steps, groups * heads]; forced [steps, groups, K] (-1: offset + drawn) and offset [groups, K]. The\n"
           "input row of step i is where(forced[i] >= 0, forced[i], offset + drawn).")
      .def("guidance", &PyDecodeBatch::guidance,
           "(lead member [G], null member [G] or -1, guidance_scale [G]): how each group's logits are formed.")
      .def("advance", &PyDecodeBatch::advance, py::arg("drawn"),
           "Appends drawn int64 [groups, heads]; returns the indices of the groups that reached their length.")
      .def("sample_and_advance", &PyDecodeBatch::sample_and_advance, py::arg("logits"), py::arg("num_threads") = 0,
           "Draws from float32 logits [members, heads, vocab] (guided pairs mixed in float32 as\n"
           "null + (cond - null) * scale) exactly as vivace.sampling.sample, appends, returns the finished groups.");

  m.def("plan_windows", [](int64_t total, int64_t window, int64_t stride, std::vector<int64_t> segment_starts) {
          return spans(plan_windows(total, window, stride, segment_starts));
        }, py::arg("total"), py::arg("window"), py::arg("stride"), py::arg("segment_starts"),
        "Continuation windows: int64 [n, 5] rows of (index, prefix_start, new_start, new_end, segment).");
  m.def("plan_chunks", [](int64_t total, int64_t chunk) { return spans(plan_chunks(total, chunk)); },
        py::arg("total"), py::arg("chunk"), "Independent chunks: int64 [n, 5] rows as plan_windows returns.");
}

}  // namespace vivace
