#pragma once
#include <cstdint>
#include <functional>

namespace vivace {

// Runs fn(i) for every i in [0, n) on up to `threads` threads, the caller being one of them: on the OpenMP team of
// the calling thread where an OpenMP runtime is loaded (torch's libgomp: the same workers as torch's ops), else on
// std::threads kept alive between calls, so a decode step pays a wake-up, not a thread start (there a call made
// while another one runs, from a second Python thread, runs on its caller alone). fn must not throw.
void parallel_for(int64_t n, int threads, const std::function<void(int64_t)>& fn);

// Whether parallel_for runs on an OpenMP runtime loaded in this process (else on its own threads).
bool parallel_on_openmp();

}  // namespace vivace
