#pragma once
#include <stdexcept>
#include <string>
#include <vector>

namespace vivace {

// One instruction-set form of a kernel: its name as Python passes it (isa=...) and its entry point.
// Whether this CPU has AVX-512 F, BW and VNNI: the int8 and int4 kernels' vpdpbusd forms.
inline bool cpu_has_avx512_vnni() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

template <class Problem>
struct KernelIsa {
  const char* name;
  void (*run)(const Problem&, int threads);
};

// The form named among the forms this CPU runs (fastest first): "auto" the fastest; std::invalid_argument (ValueError)
// where it is none of them, or where the CPU runs none (`needs` says what the kernel needs).
template <class Problem>
const KernelIsa<Problem>& find_isa(const std::vector<KernelIsa<Problem>>& isas, const std::string& name,
                                   const std::string& kernel, const std::string& needs) {
  if (isas.empty()) throw std::invalid_argument(kernel + " needs " + needs + ", which this CPU does not have");
  if (name == "auto") return isas.front();
  for (const auto& isa : isas)
    if (name == isa.name) return isa;
  std::string known;
  for (const auto& isa : isas) known += std::string(known.empty() ? "" : ", ") + isa.name;
  throw std::invalid_argument(kernel + " isa '" + name + "' does not run on this CPU (it runs auto, " + known + ")");
}

template <class Problem>
std::vector<std::string> isa_names(const std::vector<KernelIsa<Problem>>& isas) {
  std::vector<std::string> names;
  for (const auto& isa : isas) names.emplace_back(isa.name);
  return names;
}

}  // namespace vivace
