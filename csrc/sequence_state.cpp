#include "sequence_state.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace vivace {

SequenceState::SequenceState(const int64_t* prompt, int64_t prompt_len, int64_t max_len,
                             std::shared_ptr<const TokenSchedule> schedule)
    : schedule_(std::move(schedule)), length_(prompt_len), prompt_len_(prompt_len), max_len_(max_len) {
  if (prompt_len <= 0) throw std::invalid_argument("a sequence needs at least one prompt row");
  if (max_len < prompt_len)
    throw std::invalid_argument("max_len " + std::to_string(max_len) + " is shorter than the " +
                                std::to_string(prompt_len) + "-row prompt");
  if (max_len - prompt_len > schedule_->max_steps())
    throw std::invalid_argument(std::to_string(max_len - prompt_len) + " new steps exceed the schedule's " +
                                std::to_string(schedule_->max_steps()));
  const int64_t k = num_codebooks();
  tokens_.resize(max_len * k);
  std::copy(prompt, prompt + prompt_len * k, tokens_.begin());
}

void SequenceState::append_drawn(const int64_t* drawn) {
  if (finished()) throw std::out_of_range("the sequence already holds its " + std::to_string(max_len_) + " rows");
  schedule_->input_row(num_new(), drawn, tokens_.data() + length_ * num_codebooks());
  ++length_;
}

void SequenceState::append_row(const int64_t* row) {
  if (finished()) throw std::out_of_range("the sequence already holds its " + std::to_string(max_len_) + " rows");
  std::copy(row, row + num_codebooks(), tokens_.begin() + length_ * num_codebooks());
  ++length_;
}

}  // namespace vivace
