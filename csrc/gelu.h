#pragma once
#include <cstdint>

namespace vivace {

// x * 0.5 * (1 + erf(x / sqrt(2))) in place: the exact GELU (torch's approximate="none") with erf by Abramowitz and
// Stegun 7.1.26 (|error| < 1.5e-7) and an exp of its own, so within 1e-6 of torch.nn.functional.gelu (absolute; the
// largest differences where erf's error is scaled by |x| / 2 and 1 + erf cancels, x between -4 and -2), not bit
// for bit. The same bits on every call on one CPU (AVX-512 where it has it, scalar code otherwise).
void gelu_inplace(float* x, int64_t n);

}  // namespace vivace
