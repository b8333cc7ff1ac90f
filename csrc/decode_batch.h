#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "sampler.h"
#include "sequence_state.h"

namespace vivace {

// How one sampling group draws: the first member's logits (or, guided, the mix of its two members'), with these
// filters, keyed by (seed, stream, step) for the counter-based draw.
struct GroupSampling {
  double temperature;  // 0 = greedy
  int64_t top_k;       // 0 = off
  double top_p;        // 1 = off
  uint64_t seed;
  uint64_t stream;
  double guidance_scale;  // guided groups (two members): null + (cond - null) * guidance_scale
};

// Where a step's inputs go; each array has one entry (or row) per member.
struct StepInputs {
  int64_t* input_ids;      // [members, num_codebooks]
  int64_t* positions;      // [members]
  int64_t* slot_mapping;   // [members]
  int32_t* block_tables;   // [members, table_width], padded with block 0
  int32_t* context_lens;   // [members]
};

// The per-step bookkeeping of a stage's decode batch. Every group is one sampling unit (a sequence, or a guided
// pair); each of its members is one row of the forward, at its own position of its own schedule. A step is
// prepare() -> forward -> sample_and_advance(logits) (or, with tokens drawn elsewhere, advance(drawn)).
class DecodeBatch {
 public:
  DecodeBatch(int64_t block_size, std::vector<std::vector<std::shared_ptr<SequenceState>>> groups,
              std::vector<GroupSampling> sampling);

  int64_t num_groups() const { return static_cast<int64_t>(groups_.size()); }
  int64_t num_members() const { return static_cast<int64_t>(members_.size()); }
  int64_t num_heads() const { return num_heads_; }
  int64_t num_codebooks() const { return num_codebooks_; }
  int64_t table_width() const { return table_width_; }
  int64_t first_member(int64_t group) const { return first_member_[group]; }
  int64_t group_size(int64_t group) const { return static_cast<int64_t>(groups_[group].size()); }
  double guidance_scale(int64_t group) const { return sampling_[group].guidance_scale; }

  // Cache blocks each group still lacks so that every member can store its last row; out has num_groups entries.
  void missing_blocks(int64_t* out) const;
  // Every member's last row at position length - 1, its cache slot and its context. Throws if a block is missing.
  void prepare(const StepInputs& out) const;
  // One entry per (group, head), group-major: the window of this step and the draw's counter (step) included.
  std::vector<SamplingParams> sampling_rows() const;
  // What the next `steps` steps need on a device that draws and advances without the host: per step and
  // (group, head) the window and the draw's counter, per step and (group, codebook) the forced id (-1: offset +
  // drawn), per (group, codebook) the offset. Every group must have `steps` steps left.
  struct StepPlan {
    std::vector<int64_t> vocab_lo, vocab_hi, forced, offset;
    std::vector<uint64_t> step;
  };
  StepPlan plan_steps(int64_t steps) const;
  // Steps every group still has to go.
  int64_t steps_left() const;
  // Appends drawn [groups, heads] to every member; returns the groups that reached their length.
  std::vector<int64_t> advance(const int64_t* drawn);
  // Draws [groups, heads] from float32 logits [members, heads, vocab] with the semantics of vivace.sampling.sample.
  // On a bad row returns false with its message in *error.
  bool sample(const float* logits, int64_t vocab, const TorchNumerics& numerics, int num_threads, int64_t* drawn,
              std::string* error) const;

 private:
  // Group's sampling row for head at the step `ahead` steps from now: its window and its draw's counter.
  SamplingParams row_at(int64_t group, int64_t head, int64_t ahead) const;

  int64_t block_size_;
  std::vector<std::vector<std::shared_ptr<SequenceState>>> groups_;
  std::vector<GroupSampling> sampling_;
  std::vector<SequenceState*> members_;   // groups' members in order: the rows of the forward
  std::vector<int64_t> first_member_;     // per group
  int64_t num_heads_ = 0, num_codebooks_ = 0, table_width_ = 0;
};

}  // namespace vivace
