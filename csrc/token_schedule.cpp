#include "token_schedule.h"

#include <limits>
#include <stdexcept>
#include <string>

namespace vivace {

TokenSchedule TokenSchedule::time_major(int64_t num_levels, int64_t codebook_size, int64_t input_offset,
                                        int64_t first_level) {
  if (num_levels <= 0 || codebook_size <= 0 || input_offset < 0 || first_level < 0)
    throw std::invalid_argument("time-major schedule: num_levels and codebook_size must be positive, input_offset "
                                "and first_level non-negative");
  TokenSchedule s;
  s.num_levels_ = num_levels;
  s.codebook_size_ = codebook_size;
  s.input_offset_ = input_offset;
  s.first_level_ = first_level;
  return s;
}

TokenSchedule TokenSchedule::delay(std::vector<int64_t> grid, int64_t num_codebooks, int64_t first,
                                   int64_t vocab_size) {
  if (num_codebooks <= 0 || grid.size() % num_codebooks)
    throw std::invalid_argument("delay schedule: the grid must be [num_codebooks, positions]");
  const int64_t grid_len = static_cast<int64_t>(grid.size()) / num_codebooks;
  if (first < 0 || first > grid_len)
    throw std::invalid_argument("delay schedule: first position " + std::to_string(first) + " is outside the " +
                                std::to_string(grid_len) + "-position grid");
  if (vocab_size <= 0) throw std::invalid_argument("delay schedule: vocab_size must be positive");
  TokenSchedule s;
  s.is_delay_ = true;
  s.num_heads_ = num_codebooks;
  s.grid_ = std::move(grid);
  s.grid_len_ = grid_len;
  s.first_ = first;
  s.vocab_size_ = vocab_size;
  return s;
}

int64_t TokenSchedule::max_steps() const {
  return is_delay_ ? grid_len_ - first_ : std::numeric_limits<int64_t>::max();
}

std::pair<int64_t, int64_t> TokenSchedule::window(int64_t new_index, int64_t head) const {
  if (is_delay_) return {0, vocab_size_};
  const int64_t level = (first_level_ + new_index) % num_levels_;
  return {level * codebook_size_, (level + 1) * codebook_size_};
}

int64_t TokenSchedule::forced(int64_t new_index, int64_t k) const {
  if (!is_delay_) return -1;
  if (new_index < 0 || new_index >= max_steps())
    throw std::out_of_range("delay schedule: step " + std::to_string(new_index) + " is past the grid's " +
                            std::to_string(max_steps()) + " steps");
  return grid_[k * grid_len_ + first_ + new_index];
}

void TokenSchedule::input_row(int64_t new_index, const int64_t* drawn, int64_t* row) const {
  if (!is_delay_) {
    row[0] = input_offset_ + drawn[0];
    return;
  }
  if (new_index < 0 || new_index >= max_steps())
    throw std::out_of_range("delay schedule: step " + std::to_string(new_index) + " is past the grid's " +
                            std::to_string(max_steps()) + " steps");
  const int64_t position = first_ + new_index;
  for (int64_t k = 0; k < num_heads_; ++k) {
    const int64_t forced = grid_[k * grid_len_ + position];
    row[k] = forced >= 0 ? forced : drawn[k];
  }
}

}  // namespace vivace
