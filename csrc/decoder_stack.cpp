#include "decoder_stack.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <unistd.h>

#include "float32_linear.h"
#include "gelu.h"
#include "int4_linear.h"
#include "int8_linear.h"
#include "kv_store.h"
#include "numpy_args.h"
#include "paged_attention.h"
#include "thread_pool.h"

namespace vivace {
namespace {

namespace py = pybind11;

// LayerNorm or RMSNorm over rows of `dim` floats, its statistics summed in float64 (torch sums in float32: the two
// agree to a few float32 ulps, not bit for bit).
// The largest data cache of CPU 0, as Linux's sysfs lists it (its size as "32768K"); else glibc's sysconf figure
// (which some VMs report as several times the cache one core shares); else 8 MiB.
int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    int64_t best = 0;
    for (int index = 0; index < 8; ++index) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
      std::ifstream type_file(dir + "type"), size_file(dir + "size");
      std::string type, size;
      if (!(type_file >> type) || !(size_file >> size) || type == "Instruction" || size.empty()) continue;
      const char unit = size.back();
      const int64_t scale = unit == 'K' ? 1024 : unit == 'M' ? 1024 * 1024 : 1;
      try {
        best = std::max<int64_t>(best, std::stoll(scale == 1 ? size : size.substr(0, size.size() - 1)) * scale);
      } catch (const std::exception&) {
      }
    }
#ifdef _SC_LEVEL3_CACHE_SIZE
    if (best <= 0) best = std::max<int64_t>(sysconf(_SC_LEVEL3_CACHE_SIZE), sysconf(_SC_LEVEL2_CACHE_SIZE));
#endif
    return best > 0 ? best : int64_t{8} << 20;
  }();
  return bytes;
}

// sum over i < n of term(i) in float64, on eight independent accumulators: one chain of dependent adds is bound by
// the add's latency, and the norms of a decode step's rows are a fixed cost per row at every batch size
template <typename Term>
double sum8(int64_t n, Term term) {
  double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int lane = 0; lane < 8; ++lane) lanes[lane] += term(i + lane);
  for (; i < n; ++i) lanes[0] += term(i);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

struct Norm {
  const float* weight = nullptr;
  const float* bias = nullptr;  // LayerNorm's, or null
  float eps = 0.0f;
  bool rms = false;

  void apply(const float* x, float* out, int64_t rows, int64_t dim) const {
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = x + r * dim;
      float* y = out + r * dim;
      if (rms) {
        const double squares = sum8(dim, [&](int64_t i) { return static_cast<double>(row[i]) * row[i]; });
        const float scale = static_cast<float>(1.0 / std::sqrt(squares / dim + eps));
        for (int64_t i = 0; i < dim; ++i) y[i] = row[i] * scale * weight[i];
        continue;
      }
      const double mean = sum8(dim, [&](int64_t i) { return static_cast<double>(row[i]); }) / dim;
      const double squares = sum8(dim, [&](int64_t i) { return (row[i] - mean) * (row[i] - mean); });
      const double rstd = 1.0 / std::sqrt(squares / dim + eps);
      // torch's layer norm kernel: (x * rstd + (-rstd * mean)) * weight + bias
      const float scale = static_cast<float>(rstd), shift = static_cast<float>(-rstd * mean);
      for (int64_t i = 0; i < dim; ++i) y[i] = (row[i] * scale + shift) * weight[i] + (bias ? bias[i] : 0.0f);
    }
  }
};

enum class Activation { kNone, kGelu, kRelu };

// One linear layer as vivace.model.decoder_stack hands it over: an Int8Linear (its buffers, read in place, its kernel,
// and from how many rows on it runs the amx kernel instead: the same bits), an Int4Linear (its packed weights) or a
// float32 nn.Linear.
struct Linear {
  Int8Linear int8{};  // x, out and rows filled per call
  std::string isa;
  int64_t amx_from_rows = 0;  // 0: never
  std::optional<Float32Linear> float32;  // set for a float32 layer (then int8 is unused)
  std::optional<Int4Linear> int4;  // set for an int4 layer (then int8 is unused)
  Activation activation = Activation::kNone;

  int64_t in_features() const { return float32 ? float32->in_features : int4 ? int4->in_features : int8.in_features; }
  int64_t out_features() const { return float32 ? float32->out_features : int4 ? int4->out_features : int8.out_features; }
  // the bytes of weights one call reads
  int64_t weight_bytes() const {
    const int64_t count = in_features() * out_features();
    if (float32) return count * (float32->weight_bf16 ? 2 : 4);
    return int4 ? count / 2 : count;
  }

  void run(const float* x, float* out, int64_t rows, int threads) const {
    if (float32) {
      Float32Linear call = *float32;
      call.x = x;
      call.out = out;
      call.rows = rows;
      float32_linear(call, threads);
    } else if (int4) {
      Int4Linear call = *int4;
      call.x = x;
      call.out = out;
      call.rows = rows;
      int4_linear(call, threads);
    } else {
      Int8Linear call = int8;
      call.x = x;
      call.out = out;
      call.rows = rows;
      int8_linear(call, threads, amx_from_rows > 0 && rows >= amx_from_rows ? std::string("amx_int8") : isa);
    }
    const int64_t n = rows * out_features();
    if (activation == Activation::kGelu) gelu_inplace(out, n);
    if (activation == Activation::kRelu)
      for (int64_t i = 0; i < n; ++i) out[i] = std::max(out[i], 0.0f);
  }
};

struct Layer {
  Norm attn_norm, ffn_norm;
  Linear qkv, o, fc1, fc2;
  std::optional<Norm> cross_norm;
  std::optional<Linear> cross_q, cross_o;
};

// What a decode step reads besides the weights, checked once per call.
struct StepInputs {
  int64_t rows;
  std::vector<void*> key_caches, value_caches;
  CacheFormat cache_format = CacheFormat::kFloat32;
  int64_t num_blocks = 0, block_size = 0;
  const int64_t* slots;
  const int32_t* block_tables;
  int64_t max_blocks;
  const int32_t* context_lens;
  const float* distance_bias = nullptr;
  int64_t bias_width = 0;
  float scale;
  int64_t cached_floats = 0;  // key and value floats the attention reads per layer (its thread count)
  // cross-attention: per layer [num_seqs, enc_len, heads, head_dim]; token_seq[r] is row r's sequence
  std::vector<const float*> cross_keys, cross_values;
  const bool* enc_mask = nullptr;
  const int64_t* token_seq = nullptr;
  int64_t cross_seqs = 0, enc_len = 0;
};

class DecoderStack {
 public:
  DecoderStack(const py::list& layers, py::object final_norm, int64_t num_heads, int64_t head_dim,
               const py::list& output_heads, py::object row_slices)
      : num_heads_(num_heads), head_dim_(head_dim), d_model_(num_heads * head_dim) {
    if (num_heads < 1 || head_dim < 1) throw py::value_error("num_heads and head_dim must be >= 1");
    if (layers.empty()) throw py::value_error("layers must not be empty");
    for (py::size_t i = 0; i < layers.size(); ++i) layers_.push_back(parse_layer(layers[i].cast<py::dict>(), i));
    if (!final_norm.is_none()) final_norm_ = parse_norm(final_norm, "final_norm");
    const bool cross = layers_.front().cross_q.has_value();
    for (const Layer& layer : layers_)
      if (layer.cross_q.has_value() != cross)
        throw py::value_error("either every layer or none has cross-attention");
    d_ff_ = layers_.front().fc1.out_features();
    for (py::size_t i = 0; i < output_heads.size(); ++i) {
      const std::string name = "output_heads[" + std::to_string(i) + "]";
      Linear head = parse_linear(output_heads[i], name);
      if (head.in_features() != d_model_ || head.activation != Activation::kNone ||
          (i > 0 && head.out_features() != output_heads_.front().out_features()))
        throw py::value_error(name + " must read d_model = " + std::to_string(d_model_) +
                              " inputs, apply no activation and have the first head's outputs");
      output_heads_.push_back(std::move(head));
    }
    row_slices_ = row_slices.is_none() ? layer_weight_bytes() <= last_level_cache_bytes() : row_slices.cast<bool>();
  }

  // The layers' weights, all of which every decode step reads.
  int64_t layer_weight_bytes() const {
    int64_t bytes = 0;
    for (const Layer& layer : layers_) {
      for (const Linear* linear : {&layer.qkv, &layer.o, &layer.fc1, &layer.fc2}) bytes += linear->weight_bytes();
      if (layer.cross_q) bytes += layer.cross_q->weight_bytes() + layer.cross_o->weight_bytes();
    }
    return bytes;
  }

  bool row_slices() const { return row_slices_; }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  bool has_cross() const { return layers_.front().cross_q.has_value(); }
  int64_t num_output_heads() const { return static_cast<int64_t>(output_heads_.size()); }

  // hidden [rows, d_model] -> logits [rows, heads, vocab]: every output head in one call.
  py::array_t<float> logits(py::handle hidden_object, int num_threads) {
    if (num_threads < 1) throw py::value_error("num_threads must be >= 1");
    if (output_heads_.empty()) throw py::value_error("this stack was built without output_heads");
    const auto hidden = typed_array<float>(hidden_object, "hidden", "float32", 2, true);
    if (hidden.shape(1) != d_model_)
      throw py::value_error("hidden " + shape_of(hidden) + " must have d_model = " + std::to_string(d_model_) +
                            " columns");
    const int64_t rows = hidden.shape(0), heads = num_output_heads(), vocab = output_heads_.front().out_features();
    py::array_t<float> out({rows, heads, vocab});
    {
      py::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(mutex_);
      head_out_.resize(rows * vocab);
      float* logits = out.mutable_data();
      for (int64_t h = 0; h < heads; ++h) {
        output_heads_[h].run(hidden.data(), head_out_.data(), rows, num_threads);
        for (int64_t r = 0; r < rows; ++r)
          std::memcpy(logits + (r * heads + h) * vocab, head_out_.data() + r * vocab, vocab * sizeof(float));
      }
    }
    return out;
  }

  py::array_t<float> decode(py::handle hidden_object, const py::list& key_caches, const py::list& value_caches,
                            py::handle slots_object, py::handle tables_object, py::handle lens_object, double scale,
                            py::object bias_object, py::object cross_keys, py::object cross_values,
                            py::object enc_mask_object, py::object token_seq_object, int num_threads) {
    if (num_threads < 1) throw py::value_error("num_threads must be >= 1");
    const auto hidden = typed_array<float>(hidden_object, "hidden", "float32", 2, true);
    if (hidden.shape(1) != d_model_)
      throw py::value_error("hidden " + shape_of(hidden) + " must have d_model = " + std::to_string(d_model_) +
                            " columns");
    StepInputs in{};
    in.rows = hidden.shape(0);
    in.scale = static_cast<float>(scale);
    std::vector<py::array> keep;  // the arrays the raw pointers below point into
    check_caches(key_caches, value_caches, in, keep);
    const auto slots = typed_array<int64_t>(slots_object, "slot_mapping", "int64", 1, true);
    const auto tables = typed_array<int32_t>(tables_object, "block_tables", "int32", 2, true);
    const auto lens = typed_array<int32_t>(lens_object, "context_lens", "int32", 1, true);
    if (slots.shape(0) != in.rows || tables.shape(0) != in.rows || lens.shape(0) != in.rows)
      throw py::value_error("slot_mapping " + shape_of(slots) + ", block_tables " + shape_of(tables) +
                            " and context_lens " + shape_of(lens) + " must have one row per hidden row (" +
                            std::to_string(in.rows) + ")");
    in.slots = slots.data();
    in.block_tables = tables.data();
    in.max_blocks = tables.shape(1);
    in.context_lens = lens.data();
    check_rows(in);
    const auto bias = distance_bias_argument(bias_object, num_heads_);
    if (!bias_object.is_none()) {
      in.distance_bias = bias.data();
      in.bias_width = bias.shape(1);
    }
    if (has_cross() != !cross_keys.is_none())
      throw py::value_error(has_cross() ? "this stack's layers cross-attend: pass cross_keys, cross_values, enc_mask "
                                          "and token_seq"
                                        : "this stack has no cross-attention: cross_keys must be None");
    if (has_cross()) check_cross(cross_keys, cross_values, enc_mask_object, token_seq_object, in, keep);

    py::array_t<float> out({in.rows, d_model_});
    {
      py::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(mutex_);
      run(hidden.data(), in, out.mutable_data(), num_threads);
    }
    return out;
  }

 private:
  Norm parse_norm(py::handle object, const std::string& name) {
    const auto fields = object.cast<py::tuple>();
    if (fields.size() != 4) throw py::value_error(name + " must be (weight, bias or None, eps, rms)");
    Norm norm;
    norm.weight = keep_array<float>(fields[0], name + ".weight", "float32", 1);
    if (!fields[1].is_none()) norm.bias = keep_array<float>(fields[1], name + ".bias", "float32", 1);
    norm.eps = fields[2].cast<float>();
    norm.rms = fields[3].cast<bool>();
    return norm;
  }

  static Activation parse_activation(py::handle object, const std::string& name) {
    const auto activation = object.cast<std::string>();
    if (activation == "gelu") return Activation::kGelu;
    if (activation == "relu") return Activation::kRelu;
    if (activation != "none")
      throw py::value_error(name + " activation must be 'none', 'gelu' or 'relu', got '" + activation + "'");
    return Activation::kNone;
  }

  Linear parse_linear(py::handle object, const std::string& name) {
    const auto fields = object.cast<py::tuple>();
    if (fields.size() > 0 && py::isinstance<py::str>(fields[0])) {  // the tagged forms
      const auto tag = fields[0].cast<std::string>();
      if (tag == "int4" && fields.size() == 6) return parse_int4(fields, name);
      if (tag == "bfloat16" && fields.size() == 4) return parse_bfloat16(fields, name);
      throw py::value_error(name + " must be ('int4', packed, bias, in_features, out_features, activation) or "
                                   "('bfloat16', weight bits, bias, activation), got '" + tag + "' with " +
                            std::to_string(fields.size()) + " fields");
    }
    Linear linear;
    if (fields.size() == 3) {  // float32
      const auto weight = typed_array<float>(fields[0], (name + ".weight").c_str(), "float32", 2, false);
      held_.push_back(weight);
      Float32Linear p{nullptr, weight.data(), nullptr, nullptr, 0, weight.shape(1), weight.shape(0)};
      p.bias = optional_bias_of(fields[1], name, p.out_features);
      linear.float32 = p;
      linear.activation = parse_activation(fields[2], name);
      return linear;
    }
    if (fields.size() != 8)
      throw py::value_error(name + " must be (weight, bias, activation) for a float32 layer, (weight, scales, "
                                   "weight_sums, bias, isa, vnni_weight, amx_from_rows, activation) for an int8 one or "
                                   "('int4', packed, bias, in_features, out_features, activation) for an int4 one or "
                                   "('bfloat16', weight bits, bias, activation) for a bfloat16-weight one");
    const auto weight = typed_array<int8_t>(fields[0], (name + ".weight").c_str(), "int8", 2, false);
    held_.push_back(weight);
    Int8Linear& p = linear.int8;
    p.weight = weight.data();
    p.out_features = weight.shape(0);
    p.in_features = weight.shape(1);
    p.scales = keep_array<float>(fields[1], name + ".scales", "float32", 1, p.out_features);
    p.weight_sums = keep_array<int32_t>(fields[2], name + ".weight_sums", "int32", 1, p.out_features);
    p.bias = optional_bias_of(fields[3], name, p.out_features);
    linear.isa = fields[4].cast<std::string>();
    if (!fields[5].is_none()) {
      const auto packed = typed_array<int8_t>(fields[5], (name + ".vnni_weight").c_str(), "int8", 4, false);
      if (packed.shape(0) != (p.out_features + 63) / 64 || packed.shape(1) != (p.in_features + 3) / 4)
        throw py::value_error(name + ".vnni_weight " + shape_of(packed) + " must be int8_vnni_pack(weight)");
      held_.push_back(packed);
      p.vnni_weight = packed.data();
    }
    linear.amx_from_rows = fields[6].cast<int64_t>();
    linear.activation = parse_activation(fields[7], name);
    return linear;
  }

  // ("int4", packed uint8 [blocks, groups, bytes] as _C.int4_pack lays it out, bias, in_features, out_features,
  // activation).
  Linear parse_int4(const py::tuple& fields, const std::string& name) {
    if (int4_linear_isas().empty()) throw py::value_error(name + " is int4, which needs AVX-512 VNNI or AVX2");
    Int4Linear p{};
    p.in_features = fields[3].cast<int64_t>();
    p.out_features = fields[4].cast<int64_t>();
    const auto packed = typed_array<uint8_t>(fields[1], (name + ".packed").c_str(), "uint8", 3, false);
    check_int4_packed(packed, p.out_features, p.in_features, name + ".packed");
    held_.push_back(packed);
    p.packed = packed.data();
    p.bias = optional_bias_of(fields[2], name, p.out_features);
    Linear linear;
    linear.int4 = p;
    linear.activation = parse_activation(fields[5], name);
    return linear;
  }

  const float* optional_bias_of(py::handle bias, const std::string& name, int64_t out_features) {
    return bias.is_none() ? nullptr : keep_array<float>(bias, name + ".bias", "float32", 1, out_features);
  }

  // ("bfloat16", weight uint16 [out, in] holding bfloat16 bits, bias, activation): float32_linear on those weights.
  Linear parse_bfloat16(const py::tuple& fields, const std::string& name) {
    const auto weight = typed_array<uint16_t>(fields[1], (name + ".weight").c_str(), "uint16 (bfloat16 bits)", 2, false);
    held_.push_back(weight);
    Float32Linear p{nullptr, nullptr, nullptr, nullptr, 0, weight.shape(1), weight.shape(0)};
    p.weight_bf16 = weight.data();
    p.bias = optional_bias_of(fields[2], name, p.out_features);
    Linear linear;
    linear.float32 = p;
    linear.activation = parse_activation(fields[3], name);
    return linear;
  }

  Layer parse_layer(const py::dict& fields, py::size_t index) {
    const std::string prefix = "layers[" + std::to_string(index) + "].";
    const auto norm = [&](const char* key) {
      if (!fields.contains(key)) throw py::value_error(prefix + key + " is missing");
      return parse_norm(fields[key], prefix + key);
    };
    const auto linear = [&](const char* key, int64_t in, int64_t out) {
      if (!fields.contains(key)) throw py::value_error(prefix + key + " is missing");
      Linear l = parse_linear(fields[key], prefix + key);
      if (l.in_features() != in || (out > 0 && l.out_features() != out))
        throw py::value_error(prefix + key + " is [" + std::to_string(l.out_features()) + ", " +
                              std::to_string(l.in_features()) + "], expected " +
                              (out > 0 ? "[" + std::to_string(out) + ", " : "[any, ") + std::to_string(in) + "]");
      return l;
    };
    Layer layer;
    layer.attn_norm = norm("attn_norm");
    layer.qkv = linear("qkv", d_model_, 3 * d_model_);
    layer.o = linear("o", d_model_, d_model_);
    if (fields.contains("cross_q")) {
      layer.cross_norm = norm("cross_norm");
      layer.cross_q = linear("cross_q", d_model_, d_model_);
      layer.cross_o = linear("cross_o", d_model_, d_model_);
    }
    layer.ffn_norm = norm("ffn_norm");
    layer.fc1 = linear("fc1", d_model_, 0);
    layer.fc2 = linear("fc2", layer.fc1.out_features(), d_model_);
    if (index > 0 && layer.fc1.out_features() != layers_.front().fc1.out_features())
      throw py::value_error(prefix + "fc1 must have the first layer's d_ff outputs");
    return layer;
  }

  // A 1-d float or int array kept alive by the stack, of `length` values where length >= 0 (norms: d_model).
  template <class T>
  const T* keep_array(py::handle object, const std::string& name, const char* dtype, int ndim, int64_t length = -1) {
    const auto array = typed_array<T>(object, name.c_str(), dtype, ndim, false);
    const int64_t want = length >= 0 ? length : d_model_;
    if (array.shape(0) != want)
      throw py::value_error(name + " " + shape_of(array) + " must have " + std::to_string(want) + " values");
    held_.push_back(array);
    return array.data();
  }

  void check_caches(const py::list& key_caches, const py::list& value_caches, StepInputs& in,
                    std::vector<py::array>& keep) const {
    if (static_cast<int64_t>(key_caches.size()) != num_layers() || value_caches.size() != key_caches.size())
      throw py::value_error("key_caches and value_caches must hold one cache per layer (" +
                            std::to_string(num_layers()) + ")");
    for (py::size_t i = 0; i < key_caches.size(); ++i) {
      for (int side = 0; side < 2; ++side) {
        const py::array cache = py::array::ensure(side ? value_caches[i] : key_caches[i]);
        const std::string name = std::string(side ? "value_caches[" : "key_caches[") + std::to_string(i) + "]";
        if (!cache) throw py::value_error(name + " must be a numpy array or a CPU tensor");
        const CacheFormat format = cache_format(cache, name);
        const int64_t row = cache_row_width(format, head_dim_);
        if (cache.ndim() != 4 || cache.shape(2) != num_heads_ || cache.shape(3) != row || cache.shape(1) < 1)
          throw py::value_error(name + " " + shape_of(cache) + " must be [num_blocks, block_size, " +
                                std::to_string(num_heads_) + ", " + std::to_string(row) + "] (" +
                                cache_format_name(format) + " rows)");
        if (!(cache.flags() & py::array::c_style) || !cache.writeable())
          throw py::value_error(name + " must be writeable and C-contiguous (it is written in place)");
        if (i == 0 && side == 0) {
          in.cache_format = format;
          in.num_blocks = cache.shape(0);
          in.block_size = cache.shape(1);
        } else if (format != in.cache_format || cache.shape(0) != in.num_blocks || cache.shape(1) != in.block_size) {
          throw py::value_error(name + " " + shape_of(cache) + " must have the dtype and shape of key_caches[0]");
        }
        (side ? in.value_caches : in.key_caches).push_back(const_cast<void*>(cache.data()));
        keep.push_back(cache);
      }
    }
  }

  void check_rows(StepInputs& in) const {
    const int64_t num_slots = in.num_blocks * in.block_size;
    for (int64_t r = 0; r < in.rows; ++r) {
      if (in.slots[r] >= num_slots)
        throw py::value_error("slot_mapping holds slot " + std::to_string(in.slots[r]) + ", past the " +
                              std::to_string(num_slots) + "-slot cache");
      const int64_t length = in.context_lens[r];
      if (length < 1 || length > in.max_blocks * in.block_size)
        throw py::value_error("context_lens[" + std::to_string(r) + "] = " + std::to_string(length) +
                              " is outside [1, " + std::to_string(in.max_blocks * in.block_size) +
                              "], what its block table holds");
      for (int64_t b = 0; b * in.block_size < length; ++b) {
        const int64_t block = in.block_tables[r * in.max_blocks + b];
        if (block < 0 || block >= in.num_blocks)
          throw py::value_error("block_tables[" + std::to_string(r) + ", " + std::to_string(b) + "] = " +
                                std::to_string(block) + " is not a block of the " + std::to_string(in.num_blocks) +
                                "-block cache");
      }
      in.cached_floats += 2 * length * d_model_;
    }
  }

  void check_cross(const py::object& keys, const py::object& values, const py::object& mask_object,
                   const py::object& token_seq_object, StepInputs& in, std::vector<py::array>& keep) const {
    const auto key_list = keys.cast<py::list>(), value_list = values.cast<py::list>();
    if (static_cast<int64_t>(key_list.size()) != num_layers() || value_list.size() != key_list.size())
      throw py::value_error("cross_keys and cross_values must hold one array per layer (" +
                            std::to_string(num_layers()) + ")");
    const auto mask = typed_array<bool>(mask_object, "enc_mask", "bool", 2, true);
    const auto token_seq = typed_array<int64_t>(token_seq_object, "token_seq", "int64", 1, true);
    in.cross_seqs = mask.shape(0);
    in.enc_len = mask.shape(1);
    if (token_seq.shape(0) != in.rows)
      throw py::value_error("token_seq " + shape_of(token_seq) + " must have one entry per hidden row");
    for (int64_t r = 0; r < in.rows; ++r)
      if (token_seq.data()[r] < 0 || token_seq.data()[r] >= in.cross_seqs)
        throw py::value_error("token_seq[" + std::to_string(r) + "] = " + std::to_string(token_seq.data()[r]) +
                              " is not one of the " + std::to_string(in.cross_seqs) + " sequences of enc_mask");
    for (py::size_t i = 0; i < key_list.size(); ++i) {
      for (int side = 0; side < 2; ++side) {
        const std::string name = std::string(side ? "cross_values[" : "cross_keys[") + std::to_string(i) + "]";
        const auto array = typed_array<float>(side ? value_list[i] : key_list[i], name.c_str(), "float32", 4, false);
        if (array.shape(0) != in.cross_seqs || array.shape(1) != in.enc_len || array.shape(2) != num_heads_ ||
            array.shape(3) != head_dim_)
          throw py::value_error(name + " " + shape_of(array) + " must be [" + std::to_string(in.cross_seqs) + ", " +
                                std::to_string(in.enc_len) + ", " + std::to_string(num_heads_) + ", " +
                                std::to_string(head_dim_) + "] (enc_mask's sequences and length)");
        (side ? in.cross_values : in.cross_keys).push_back(array.data());
        keep.push_back(array);
      }
    }
    keep.push_back(mask);
    keep.push_back(token_seq);
    in.enc_mask = mask.data();
    in.token_seq = token_seq.data();
  }

  // Attention of each row's query [heads, head_dim] over its sequence's encoder keys and values, as
  // vivace.model.transformer.CrossAttention: masked scores become float32's lowest value rather than -inf, so a
  // row with every position masked (guidance's null condition) attends uniformly instead of turning into NaN.
  void cross_attention(const float* query, const float* keys, const float* values, const StepInputs& in,
                       float* out, std::vector<float>& scores) const {
    const int64_t heads = num_heads_, dim = head_dim_, len = in.enc_len;
    scores.resize(len);
    for (int64_t r = 0; r < in.rows; ++r) {
      const int64_t s = in.token_seq[r];
      const bool* mask = in.enc_mask + s * len;
      for (int64_t h = 0; h < heads; ++h) {
        const float* q = query + (r * heads + h) * dim;
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t e = 0; e < len; ++e) {
          const float* k = keys + ((s * len + e) * heads + h) * dim;
          float dot = 0.0f;
          for (int64_t d = 0; d < dim; ++d) dot += q[d] * k[d];
          scores[e] = mask[e] ? dot * in.scale : std::numeric_limits<float>::lowest();
          top = std::max(top, scores[e]);
        }
        float total = 0.0f;
        for (int64_t e = 0; e < len; ++e) total += scores[e] = std::exp(scores[e] - top);
        float* o = out + (r * heads + h) * dim;
        std::fill(o, o + dim, 0.0f);  // and so it stays where there is no encoder state (as torch's empty softmax)
        for (int64_t e = 0; e < len; ++e) {
          const float weight = scores[e] / total;
          const float* v = values + ((s * len + e) * heads + h) * dim;
          for (int64_t d = 0; d < dim; ++d) o[d] += weight * v[d];
        }
      }
    }
  }

  // residual += update (where there is one), then normed = norm(residual)
  void add_norm(float* residual, const float* update, const Norm& norm, float* normed, int64_t rows) const {
    if (update != nullptr)
      for (int64_t i = 0; i < rows * d_model_; ++i) residual[i] += update[i];
    norm.apply(residual, normed, rows, d_model_);
  }

  // Rows are independent, so where the layers' weights fit in the last-level cache (row_slices_), several threads
  // and several rows run as one thread per slice of the rows, every layer, each slice on its own scratch: at decode
  // batch sizes one linear is too short to split across threads, and every thread reads the weights from cache.
  // Where they do not fit, each linear and the attention split across the threads instead, so each weight byte
  // comes from memory once per step. Slices balance their attention reads against the linears' work; a row's
  // arithmetic is the same in any slice, so its bits do not change.
  void run(const float* hidden, const StepInputs& in, float* out, int threads) {
    const int64_t parts = row_slices_ ? std::min<int64_t>(threads, in.rows) : 1;
    if (parts <= 1) {
      scratch_.resize(1);
      run_rows(hidden, in, out, threads, scratch_[0]);
      return;
    }
    const std::vector<int64_t> bounds = slice_bounds(in, parts);
    scratch_.resize(parts);
    parallel_for(parts, static_cast<int>(parts), [&](int64_t part) {
      const int64_t first = bounds[part], count = bounds[part + 1] - first;
      if (count == 0) return;
      StepInputs slice = in;
      slice.rows = count;
      slice.slots = in.slots + first;
      slice.block_tables = in.block_tables + first * in.max_blocks;
      slice.context_lens = in.context_lens + first;
      if (in.token_seq) slice.token_seq = in.token_seq + first;
      slice.cached_floats = 0;
      for (int64_t r = 0; r < count; ++r) slice.cached_floats += 2 * slice.context_lens[r] * d_model_;
      run_rows(hidden + first * d_model_, slice, out + first * d_model_, 1, scratch_[part]);
    });
  }

  // Boundaries of `parts` contiguous row slices of about equal work: a row's keys and values read per layer, plus
  // its linears' multiply-adds per layer at a quarter of a read each: a rough weight (on the demo stage with int8
  // weights and caches a row's linears cost about as much as 280 keys of attention; this weight says 380), only
  // to keep a long-context row from landing with many others in one slice.
  std::vector<int64_t> slice_bounds(const StepInputs& in, int64_t parts) const {
    const Layer& layer = layers_.front();
    int64_t macs = 0;
    for (const Linear* linear : {&layer.qkv, &layer.o, &layer.fc1, &layer.fc2})
      macs += linear->in_features() * linear->out_features();
    std::vector<double> work(in.rows + 1, 0.0);
    for (int64_t r = 0; r < in.rows; ++r)
      work[r + 1] = work[r] + 2.0 * in.context_lens[r] * d_model_ + 0.25 * static_cast<double>(macs);
    std::vector<int64_t> bounds{0};
    for (int64_t part = 1; part < parts; ++part) {
      const double target = work[in.rows] * part / parts;
      int64_t cut = bounds.back();
      while (cut < in.rows && work[cut + 1] <= target) ++cut;
      if (cut < in.rows && target - work[cut] > work[cut + 1] - target) ++cut;  // the nearer boundary
      bounds.push_back(std::max(cut, bounds.back()));
    }
    bounds.push_back(in.rows);
    return bounds;
  }

  // A step's activations, one set per row slice.
  struct Scratch {
    std::vector<float> residual, normed, update, qkv, query, attended, ffn, scores;
  };

  void run_rows(const float* hidden, const StepInputs& in, float* out, int threads, Scratch& s) const {
    const int64_t rows = in.rows, d = d_model_;
    s.residual.assign(hidden, hidden + rows * d);
    s.normed.resize(rows * d);
    s.update.resize(rows * d);
    s.qkv.resize(rows * 3 * d);
    s.query.resize(rows * d);
    s.attended.resize(rows * d);
    s.ffn.resize(rows * d_ff_);
    const int attention_threads = decode_attention_threads(in.cached_floats, threads);
    const float* update = nullptr;
    for (int64_t i = 0; i < num_layers(); ++i) {
      const Layer& layer = layers_[i];
      add_norm(s.residual.data(), update, layer.attn_norm, s.normed.data(), rows);
      layer.qkv.run(s.normed.data(), s.qkv.data(), rows, threads);
      store_kv_rows(s.qkv.data() + d, s.qkv.data() + 2 * d, 3 * d, in.key_caches[i], in.value_caches[i],
                    in.cache_format, in.slots, rows, num_heads_, head_dim_);
      for (int64_t r = 0; r < rows; ++r) std::memcpy(&s.query[r * d], &s.qkv[r * 3 * d], d * sizeof(float));
      const PagedDecode attention{s.query.data(), in.key_caches[i], in.value_caches[i], in.cache_format,
                                  in.block_tables, in.context_lens, in.distance_bias, s.attended.data(), rows,
                                  num_heads_, head_dim_, in.block_size, in.max_blocks, in.bias_width, in.scale};
      paged_decode_attention(attention, attention_threads);
      layer.o.run(s.attended.data(), s.update.data(), rows, threads);
      update = s.update.data();
      if (layer.cross_q) {
        add_norm(s.residual.data(), update, *layer.cross_norm, s.normed.data(), rows);
        layer.cross_q->run(s.normed.data(), s.query.data(), rows, threads);
        cross_attention(s.query.data(), in.cross_keys[i], in.cross_values[i], in, s.attended.data(), s.scores);
        layer.cross_o->run(s.attended.data(), s.update.data(), rows, threads);
      }
      add_norm(s.residual.data(), update, layer.ffn_norm, s.normed.data(), rows);
      layer.fc1.run(s.normed.data(), s.ffn.data(), rows, threads);
      layer.fc2.run(s.ffn.data(), s.update.data(), rows, threads);
    }
    if (final_norm_) {
      add_norm(s.residual.data(), update, *final_norm_, out, rows);
    } else {
      for (int64_t i = 0; i < rows * d; ++i) out[i] = s.residual[i] + update[i];
    }
  }

  int64_t num_heads_, head_dim_, d_model_, d_ff_ = 0;
  std::vector<Layer> layers_;
  std::optional<Norm> final_norm_;
  std::vector<Linear> output_heads_;
  std::vector<py::array> held_;  // the weights the layers point into
  std::mutex mutex_;  // one step at a time: the scratch below is the stack's
  bool row_slices_ = false;
  std::vector<Scratch> scratch_;
  std::vector<float> head_out_;
};

}  // namespace

void register_decoder_stack(py::module_& m) {
  py::class_<DecoderStack>(m, "DecoderStack")
      .def(py::init<const py::list&, py::object, int64_t, int64_t, const py::list&, py::object>(), py::arg("layers"),
           py::arg("final_norm"), py::arg("num_heads"), py::arg("head_dim"), py::arg("output_heads") = py::list(),
           py::arg("row_slices") = py::none(),
           "layers: one dict per decoder layer: 'attn_norm', 'ffn_norm' (and 'cross_norm') as (weight, bias or None,\n"
           "eps, rms) of float32 arrays; 'qkv', 'o', 'fc1', 'fc2' (and 'cross_q', 'cross_o') as float32 linears\n"
           "(weight float32 [out, in], bias float32 [out] or None, activation) or int8 ones (weight int8 [out, in],\n"
           "scales float32 [out], weight_sums int32 [out], bias or None, isa, vnni_weight or None, amx_from_rows\n"
           "(0: never), activation) or int4 ones ('int4', packed uint8 as int4_pack lays it out, bias or None,\n"
           "in_features, out_features, activation) or bfloat16-weight ones ('bfloat16', weight uint16 [out, in] of\n"
           "bfloat16 bits, bias or None, activation), activation 'none' | 'gelu' | 'relu'; every array read in place and kept alive\n"
           "by the stack. final_norm: (weight, bias, eps, rms) or None. output_heads: linears as above, each\n"
           "[vocab, d_model] with activation 'none' (the same vocab for every head), for logits(). row_slices: how\n"
           "decode steps use several threads: True, one thread per slice of the rows through every layer; False,\n"
           "every linear and the attention split across the threads; None (default), row slices where the layers'\n"
           "weights fit in the last-level cache.")
      .def_property_readonly("row_slices", &DecoderStack::row_slices)
      .def_property_readonly("num_layers", &DecoderStack::num_layers)
      .def_property_readonly("has_cross", &DecoderStack::has_cross)
      .def_property_readonly("num_output_heads", &DecoderStack::num_output_heads)
      .def("logits", &DecoderStack::logits, py::arg("hidden"), py::arg("num_threads") = 1,
           "hidden float32 [rows, d_model] -> logits [rows, heads, vocab] through every output head, each head's\n"
           "kernel as in its layer (the same bits as calling the heads one by one).")
      .def("decode", &DecoderStack::decode, py::arg("hidden"), py::arg("key_caches"), py::arg("value_caches"),
           py::arg("slot_mapping"), py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"),
           py::arg("distance_bias") = py::none(), py::arg("cross_keys") = py::none(),
           py::arg("cross_values") = py::none(), py::arg("enc_mask") = py::none(), py::arg("token_seq") = py::none(),
           py::arg("num_threads") = 1,
           "One decode step of every layer: hidden float32 [rows, d_model] (the input embeddings, one token per\n"
           "row) -> the final norm's output [rows, d_model] (or the last residual where there is none). Each layer:\n"
           "norm, qkv, the row's key and value into slot_mapping's slot of its caches (float32, int16 holding bfloat16\n"
           "bits, or int8 rows with their scale; [num_blocks, block_size, heads, head_dim (+ 4 for int8)], one pair per\n"
           "layer), paged decode attention\n"
           "over block_tables / context_lens (int32, with the T5 distance_bias [heads, width] where given), o,\n"
           "then cross-attention over cross_keys / cross_values[layer] [seqs, enc_len, heads, head_dim] of\n"
           "sequence token_seq[row] (enc_mask [seqs, enc_len] bool) where the layers have it, then the FFN; each\n"
           "sublayer's output added to the residual stream. Rows are independent of one another.");
}

}  // namespace vivace
