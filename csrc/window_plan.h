#pragma once
#include <cstdint>
#include <vector>

namespace vivace {

// Generate [new_start, new_end) of a stream given [prefix_start, new_start) of earlier output as prompt, under the
// condition of story segment `segment`.
struct WindowSpan {
  int64_t index, prefix_start, new_start, new_end, segment;
};

// Continuation windows over `total` positions: the first generates up to `window` positions, each later one up to
// `stride` new positions with the rest of the window before it as prompt. No window's new part crosses a segment
// start (segment_starts: ascending, the first 0), so the condition switches exactly at segment boundaries.
std::vector<WindowSpan> plan_windows(int64_t total, int64_t window, int64_t stride,
                                     const std::vector<int64_t>& segment_starts);

// Independent chunks of `chunk` positions (no prompt), as the fine stage decodes them.
std::vector<WindowSpan> plan_chunks(int64_t total, int64_t chunk);

}  // namespace vivace
