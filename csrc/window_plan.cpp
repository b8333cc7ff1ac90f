#include "window_plan.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace vivace {

std::vector<WindowSpan> plan_windows(int64_t total, int64_t window, int64_t stride,
                                     const std::vector<int64_t>& segment_starts) {
  if (total < 0) throw std::invalid_argument("total must be >= 0, got " + std::to_string(total));
  if (window <= 0 || stride <= 0 || stride > window)
    throw std::invalid_argument("windows need 0 < stride <= window, got window " + std::to_string(window) +
                                " and stride " + std::to_string(stride));
  if (segment_starts.empty() || segment_starts[0] != 0 || !std::is_sorted(segment_starts.begin(), segment_starts.end()))
    throw std::invalid_argument("segment starts must be ascending and begin at 0");
  std::vector<WindowSpan> windows;
  for (int64_t t = 0; t < total;) {
    const auto next = std::upper_bound(segment_starts.begin(), segment_starts.end(), t);
    const int64_t segment = (next - segment_starts.begin()) - 1;
    const int64_t segment_end = next == segment_starts.end() ? total : *next;
    const int64_t new_end = std::min({t + (t == 0 ? window : stride), segment_end, total});
    windows.push_back({static_cast<int64_t>(windows.size()), std::max<int64_t>(0, new_end - window), t, new_end, segment});
    t = new_end;
  }
  return windows;
}

std::vector<WindowSpan> plan_chunks(int64_t total, int64_t chunk) {
  if (total < 0 || chunk <= 0)
    throw std::invalid_argument("chunks need total >= 0 and chunk > 0, got " + std::to_string(total) + " and " +
                                std::to_string(chunk));
  std::vector<WindowSpan> chunks;
  for (int64_t start = 0; start < total; start += chunk)
    chunks.push_back({static_cast<int64_t>(chunks.size()), start, start, std::min(start + chunk, total), 0});
  return chunks;
}

}  // namespace vivace
