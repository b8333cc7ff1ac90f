#pragma once
#include <cstdint>
#include <functional>

namespace vivace {

// Runs fn(i) for every i in [0, n) on up to `threads` threads, the caller being one of them. Workers are
// std::threads kept alive between calls, so a decode step pays a wake-up, not a thread start. A call made
// while another one runs (from a second Python thread) runs on its caller alone. fn must not throw.
void parallel_for(int64_t n, int threads, const std::function<void(int64_t)>& fn);

}  // namespace vivace
