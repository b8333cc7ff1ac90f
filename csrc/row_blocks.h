#pragma once
#include <cstdint>
#include <type_traits>

namespace vivace {

// Calls block(std::integral_constant<int, 4>{}, r) for rows r, r + 1, ... four at a time, then once for the one to
// three rows left (std::integral_constant<int, 3 | 2 | 1>): kernels whose blocks take a compile-time row count, so
// that their accumulators stay named registers.
template <class Block>
void for_row_blocks_of_4(int64_t rows, Block&& block) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) block(std::integral_constant<int, 4>{}, r);
  if (rows - r == 3) block(std::integral_constant<int, 3>{}, r);
  if (rows - r == 2) block(std::integral_constant<int, 2>{}, r);
  if (rows - r == 1) block(std::integral_constant<int, 1>{}, r);
}

}  // namespace vivace
