#pragma once
#include <cstdint>

namespace vivace {

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Bit-for-bit the draw of vivace.sampling.uniform: a uniform double in [0, 1) that depends only on
// (seed, stream, step), so tokens do not depend on batch layout or thread count.
inline double counter_uniform(uint64_t seed, uint64_t stream, uint64_t step) {
  constexpr uint64_t golden = 0x9E3779B97F4A7C15ULL;
  uint64_t key = mix64(seed + golden);
  key = mix64(key ^ (stream + golden + golden));
  const uint64_t bits = mix64(key ^ (step * golden));
  return static_cast<double>(bits >> 11) * (1.0 / 9007199254740992.0);
}

}  // namespace vivace
