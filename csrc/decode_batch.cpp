#include "decode_batch.h"

#include <algorithm>
#include <limits>
#include <stdexcept>

#include "row_kernels.h"

namespace vivace {

DecodeBatch::DecodeBatch(int64_t block_size, std::vector<std::vector<std::shared_ptr<SequenceState>>> groups,
                         std::vector<GroupSampling> sampling)
    : block_size_(block_size), groups_(std::move(groups)), sampling_(std::move(sampling)) {
  if (block_size <= 0) throw std::invalid_argument("block_size must be positive");
  if (groups_.size() != sampling_.size())
    throw std::invalid_argument(std::to_string(groups_.size()) + " groups but " + std::to_string(sampling_.size()) +
                                " sampling entries");
  for (size_t g = 0; g < groups_.size(); ++g) {
    const auto& members = groups_[g];
    if (members.empty() || members.size() > 2)
      throw std::invalid_argument("group " + std::to_string(g) + " has " + std::to_string(members.size()) +
                                  " members; a group is one sequence or a guided pair");
    first_member_.push_back(num_members());
    for (const auto& member : members) {
      if (!member) throw std::invalid_argument("group " + std::to_string(g) + " holds None");
      const int64_t heads = member->schedule().num_heads();
      if (num_heads_ == 0) num_heads_ = heads;
      if (heads != num_heads_)
        throw std::invalid_argument("group " + std::to_string(g) + ": a " + std::to_string(heads) +
                                    "-head schedule in a batch of " + std::to_string(num_heads_) + "-head schedules");
      if (member->length() != members[0]->length())
        throw std::invalid_argument("group " + std::to_string(g) + ": guided members must have equal lengths");
      members_.push_back(member.get());
      table_width_ = std::max(table_width_, (member->max_len() + block_size - 1) / block_size);
    }
  }
  num_codebooks_ = num_heads_;
}

void DecodeBatch::missing_blocks(int64_t* out) const {
  for (int64_t g = 0; g < num_groups(); ++g) {
    int64_t missing = 0;
    for (const auto& member : groups_[g]) {
      const int64_t needed = (member->length() + block_size_ - 1) / block_size_;
      missing += std::max<int64_t>(0, needed - static_cast<int64_t>(member->block_table.size()));
    }
    out[g] = missing;
  }
}

void DecodeBatch::prepare(const StepInputs& out) const {
  const int64_t k = num_codebooks_;
  for (int64_t m = 0; m < num_members(); ++m) {
    const SequenceState& member = *members_[m];
    const int64_t position = member.length() - 1;
    const int64_t block = position / block_size_;
    const auto& table = member.block_table;
    if (block >= static_cast<int64_t>(table.size()))
      throw std::runtime_error("member " + std::to_string(m) + ": position " + std::to_string(position) +
                               " has no cache block (its table holds " + std::to_string(table.size()) + ")");
    std::copy(member.row(position), member.row(position) + k, out.input_ids + m * k);
    out.positions[m] = position;
    out.slot_mapping[m] = static_cast<int64_t>(table[block]) * block_size_ + position % block_size_;
    out.context_lens[m] = static_cast<int32_t>(member.length());
    int32_t* row = out.block_tables + m * table_width_;
    const int64_t used = std::min<int64_t>(static_cast<int64_t>(table.size()), table_width_);
    std::copy(table.begin(), table.begin() + used, row);
    std::fill(row + used, row + table_width_, 0);
  }
}

SamplingParams DecodeBatch::row_at(int64_t group, int64_t head, int64_t ahead) const {
  const SequenceState& lead = *groups_[group][0];
  const GroupSampling& s = sampling_[group];
  const auto [lo, hi] = lead.schedule().window(lead.num_new() + ahead, head);
  const uint64_t step = static_cast<uint64_t>(lead.length() + ahead) * num_heads_ + head;
  return {s.temperature, s.top_k, s.top_p, lo, hi, s.seed, s.stream, step};
}

std::vector<SamplingParams> DecodeBatch::sampling_rows() const {
  std::vector<SamplingParams> rows;
  rows.reserve(num_groups() * num_heads_);
  for (int64_t g = 0; g < num_groups(); ++g)
    for (int64_t h = 0; h < num_heads_; ++h) rows.push_back(row_at(g, h, 0));
  return rows;
}

int64_t DecodeBatch::steps_left() const {
  int64_t left = std::numeric_limits<int64_t>::max();
  for (const auto& group : groups_) left = std::min(left, group[0]->max_len() - group[0]->length());
  return groups_.empty() ? 0 : left;
}

DecodeBatch::StepPlan DecodeBatch::plan_steps(int64_t steps) const {
  if (steps < 0 || steps > steps_left())
    throw std::out_of_range("plan_steps: " + std::to_string(steps) + " steps, but a group has only " +
                            std::to_string(steps_left()) + " left");
  const int64_t g_count = num_groups(), h_count = num_heads_, k_count = num_codebooks_;
  StepPlan plan;
  plan.vocab_lo.reserve(steps * g_count * h_count);
  plan.vocab_hi.reserve(steps * g_count * h_count);
  plan.step.reserve(steps * g_count * h_count);
  plan.forced.reserve(steps * g_count * k_count);
  for (int64_t i = 0; i < steps; ++i) {
    for (int64_t g = 0; g < g_count; ++g) {
      for (int64_t h = 0; h < h_count; ++h) {
        const SamplingParams row = row_at(g, h, i);
        plan.vocab_lo.push_back(row.vocab_lo);
        plan.vocab_hi.push_back(row.vocab_hi);
        plan.step.push_back(row.step);
      }
      const SequenceState& lead = *groups_[g][0];
      for (int64_t k = 0; k < k_count; ++k) plan.forced.push_back(lead.schedule().forced(lead.num_new() + i, k));
    }
  }
  for (int64_t g = 0; g < g_count; ++g)
    for (int64_t k = 0; k < k_count; ++k) plan.offset.push_back(groups_[g][0]->schedule().offset(k));
  return plan;
}

std::vector<int64_t> DecodeBatch::advance(const int64_t* drawn) {
  for (int64_t g = 0; g < num_groups(); ++g)
    if (groups_[g][0]->finished())
      throw std::out_of_range("group " + std::to_string(g) + " has already reached its length");
  std::vector<int64_t> finished;
  for (int64_t g = 0; g < num_groups(); ++g) {
    const auto& members = groups_[g];
    SequenceState& lead = *members[0];
    const int64_t position = lead.length();
    lead.append_drawn(drawn + g * num_heads_);
    for (size_t i = 1; i < members.size(); ++i) members[i]->append_row(lead.row(position));
    for (const auto& member : members) member->num_cached = position;
    if (lead.finished()) finished.push_back(g);
  }
  return finished;
}

bool DecodeBatch::sample(const float* logits, int64_t vocab, const TorchNumerics& numerics, int num_threads,
                         int64_t* drawn, std::string* error) const {
  std::vector<SamplingParams> rows = sampling_rows();
  const int64_t num_rows = static_cast<int64_t>(rows.size());
  auto name = [&](int64_t r) { return "group " + std::to_string(r / num_heads_) + " head " + std::to_string(r % num_heads_); };
  for (int64_t r = 0; r < num_rows; ++r) {
    const SamplingParams given = rows[r];
    if (!clip_window(rows[r], vocab)) {
      *error = describe_empty_window(name(r), given.vocab_lo, given.vocab_hi, vocab);
      return false;
    }
  }
  const int64_t row_stride = num_heads_ * vocab;
  RowError row_error = RowError::none;
  const int64_t bad = sample_rows(rows, vocab, numerics, sampling_threads(num_threads, num_rows, vocab),
                                  [&](int64_t r, double* x) {
    const int64_t g = r / num_heads_, lo = rows[r].vocab_lo, n = rows[r].vocab_hi - lo;
    const float* lead = logits + first_member_[g] * row_stride + (r % num_heads_) * vocab + lo;
    if (groups_[g].size() == 2)
      guide_float32(lead, lead + row_stride, n, static_cast<float>(sampling_[g].guidance_scale), x + lo);
    else
      widen(lead, n, x + lo);
  }, drawn, &row_error);
  if (bad < 0) return true;
  *error = describe_row_error(name(bad), rows[bad], row_error);
  return false;
}

}  // namespace vivace
