#pragma once
#include <cstdint>
#include <vector>

#include "candidate.h"

namespace vivace {

// Positive probabilities of one row grouped by how far below the row maximum they lie, in 1/8-binade
// buckets (the last bucket takes everything further down). Bucket order is rank order, so a top-k cut or
// a cumulative-mass query only has to sort the one or two buckets it lands in.
class ProbBuckets {
 public:
  static constexpr int kBuckets = 512;

  // Keeps the first min(limit, #positive) of probs[lo, hi) in rank order; all are <= p_max.
  void build(const double* probs, int64_t lo, int64_t hi, double p_max, int64_t limit) {
    build_from(probs + lo, hi - lo, nullptr, lo, p_max, limit);
  }
  // The same over n candidates: values[j] with token id ids[j].
  void build_candidates(const double* values, const int64_t* ids, int64_t n, double p_max, int64_t limit) {
    build_from(values, n, ids, 0, p_max, limit);
  }
  // Drops the last kept candidate in rank order.
  void drop_last();
  // The kept candidate at a rank-order position.
  const Candidate& ranked_at(int64_t position);

  int64_t size() const { return kept_; }
  // Total probability of the kept candidates, summed in an unspecified order.
  double mass();
  double min_prob();

  // Sorts the buckets covering positions [0, n), making items()[0, n) rank-ordered.
  void sort_prefix(int64_t n);

  // Position (in rank order) of the first kept candidate whose inclusive prefix mass reaches x (or, if
  // strict, exceeds x), with the prefix mass before it in *before; size() if there is none. Sums are
  // taken bucket by bucket, so they may differ from a rank-order running sum by rounding.
  int64_t find_mass(double x, bool strict, double* before);

  const Candidate* items() const { return items_.data(); }

 private:
  // ids == nullptr: the candidate at position j is token id_base + j.
  void build_from(const double* values, int64_t n, const int64_t* ids, int64_t id_base, double p_max, int64_t limit);
  void sort_bucket(int b);
  double bucket_mass(int b);
  int bucket_of(int64_t position) const;

  int32_t count_[kBuckets];
  int64_t start_[kBuckets + 1];
  double bucket_mass_[kBuckets];
  bool mass_known_[kBuckets];
  bool sorted_[kBuckets];
  int last_ = -1;  // last bucket holding kept candidates
  int64_t kept_ = 0;
  double mass_ = -1.0;  // of the kept candidates; computed on first use after a top-k cut
  std::vector<Candidate> items_;
  std::vector<uint16_t> bucket_;
  std::vector<int64_t> picked_;
};

}  // namespace vivace
