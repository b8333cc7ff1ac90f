#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "token_schedule.h"

namespace vivace {

// The tokens and KV-cache bookkeeping of one row of a stage: its input rows (num_codebooks ids each), how many
// of them have keys/values in the cache, and the cache blocks that hold them. A guided sequence runs as two rows,
// each with its own SequenceState; the decode batch appends the same drawn row to both.
class SequenceState {
 public:
  // prompt: prompt_len * num_codebooks ids, row-major.
  SequenceState(const int64_t* prompt, int64_t prompt_len, int64_t max_len, std::shared_ptr<const TokenSchedule> schedule);

  const TokenSchedule& schedule() const { return *schedule_; }
  std::shared_ptr<const TokenSchedule> schedule_ptr() const { return schedule_; }
  int64_t num_codebooks() const { return schedule_->num_codebooks(); }
  int64_t length() const { return length_; }
  int64_t prompt_len() const { return prompt_len_; }
  int64_t max_len() const { return max_len_; }
  int64_t num_new() const { return length_ - prompt_len_; }
  bool finished() const { return length_ >= max_len_; }
  const int64_t* row(int64_t position) const { return tokens_.data() + position * num_codebooks(); }
  const std::vector<int64_t>& tokens() const { return tokens_; }

  // Appends the row that the drawn ids (one per head) become at this step.
  void append_drawn(const int64_t* drawn);
  // Appends an input row as it is (the twin of a guided pair receives its partner's row).
  void append_row(const int64_t* row);

  int64_t num_cached = 0;  // leading positions whose keys/values are in the cache
  std::vector<int32_t> block_table;

 private:
  std::shared_ptr<const TokenSchedule> schedule_;
  std::vector<int64_t> tokens_;  // max_len * num_codebooks, the first length_ rows valid
  int64_t length_, prompt_len_, max_len_;
};

}  // namespace vivace
