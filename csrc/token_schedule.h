#pragma once
#include <cstdint>
#include <utility>
#include <vector>

namespace vivace {

// Which vocabulary window each output head draws from at a sequence's new_index-th generated step, and what
// the drawn tokens become as the next input row (also what the sequence records as output).
//
// time-major: one head; step t draws RVQ level (first_level + t) % num_levels, window
//   [level * codebook_size, (level + 1) * codebook_size); drawn id o becomes input id input_offset + o.
// delay: one head per codebook (MusicGen); every head draws from [0, vocab_size); grid [K, grid_len] holds the id
//   each position must take (-1: keep the drawn one) and step t fills position first + t.
class TokenSchedule {
 public:
  static TokenSchedule time_major(int64_t num_levels, int64_t codebook_size, int64_t input_offset, int64_t first_level);
  static TokenSchedule delay(std::vector<int64_t> grid, int64_t num_codebooks, int64_t first, int64_t vocab_size);

  bool is_delay() const { return is_delay_; }
  int64_t num_heads() const { return num_heads_; }
  int64_t num_codebooks() const { return num_heads_; }  // ids per input row: one per head in both kinds
  // Steps the schedule can describe (the grid's positions after first; unbounded for time-major).
  int64_t max_steps() const;

  std::pair<int64_t, int64_t> window(int64_t new_index, int64_t head) const;
  // row[k] for the new_index-th step's drawn[k], one per head.
  void input_row(int64_t new_index, const int64_t* drawn, int64_t* row) const;
  // The input row as forced(step, k) >= 0 ? forced : offset(k) + drawn[k]: the same rule as input_row, in a form
  // a device can apply to tokens it drew itself.
  int64_t forced(int64_t new_index, int64_t k) const;
  int64_t offset(int64_t k) const { return is_delay_ ? 0 : input_offset_; }
  // Output id of a stored input row: the inverse of input_row for the drawn ids that were kept.
  int64_t output_of(int64_t input_id) const { return is_delay_ ? input_id : input_id - input_offset_; }

  int64_t num_levels() const { return num_levels_; }
  int64_t codebook_size() const { return codebook_size_; }
  int64_t input_offset() const { return input_offset_; }
  int64_t first_level() const { return first_level_; }
  int64_t first() const { return first_; }
  int64_t vocab_size() const { return vocab_size_; }
  const std::vector<int64_t>& grid() const { return grid_; }

 private:
  bool is_delay_ = false;
  int64_t num_heads_ = 1;
  int64_t num_levels_ = 1, codebook_size_ = 0, input_offset_ = 0, first_level_ = 0;
  std::vector<int64_t> grid_;
  int64_t grid_len_ = 0, first_ = 0, vocab_size_ = 0;
};

}  // namespace vivace
