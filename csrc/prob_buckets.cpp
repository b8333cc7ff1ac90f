#include "prob_buckets.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "row_kernels.h"

namespace vivace {
namespace {

constexpr int kNone = ProbBuckets::kBuckets;  // bucket id of zero probabilities

// Bucket of each probability: eighth-binades (exponent and top 3 mantissa bits) below p_max.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
void bucket_ids(const double* probs, int64_t n, double p_max, uint16_t* out) {
  int64_t top;
  std::memcpy(&top, &p_max, sizeof top);
  top >>= 49;
  for (int64_t i = 0; i < n; ++i) {
    int64_t bits;
    std::memcpy(&bits, &probs[i], sizeof bits);
    const int64_t depth = std::min<int64_t>(top - (bits >> 49), kNone - 1);
    out[i] = static_cast<uint16_t>(bits > 0 ? depth : kNone);
  }
}

}  // namespace

void ProbBuckets::build_from(const double* probs, int64_t n, const int64_t* ids, int64_t id_base, double p_max,
                             int64_t limit) {
  if (static_cast<int64_t>(bucket_.size()) < n) {
    bucket_.resize(n);
    items_.resize(n);
    picked_.resize(n + 8);
  }
  uint16_t* bucket = bucket_.data();
  bucket_ids(probs, n, p_max, bucket);

  // Two interleaved histograms keep runs of one bucket off a single store-to-load chain.
  int32_t counts[2][kNone + 1] = {};
  for (int64_t i = 0; i + 1 < n; i += 2) {
    ++counts[0][bucket[i]];
    ++counts[1][bucket[i + 1]];
  }
  if (n % 2) ++counts[0][bucket[n - 1]];
  const int64_t positive = n - counts[0][kNone] - counts[1][kNone];
  const int64_t wanted = std::min(limit, positive);
  int64_t offset = 0;
  int last = -1;
  while (offset < wanted) {
    ++last;
    count_[last] = counts[0][last] + counts[1][last];
    start_[last] = offset;
    offset += count_[last];
  }
  start_[last + 1] = offset;
  last_ = last;
  std::fill_n(sorted_, last + 1, false);
  std::fill_n(mass_known_, last + 1, false);

  // Candidates down to the last wanted bucket (p >= the bucket's floor), in id order, then a counting
  // sort into their buckets.
  int64_t top;
  std::memcpy(&top, &p_max, sizeof top);
  const int64_t floor_bits = last < kBuckets - 1 ? ((top >> 49) - last) << 49 : 1;
  double floor;
  std::memcpy(&floor, &floor_bits, sizeof floor);
  int64_t* picked = picked_.data();
  const int64_t m = indices_at_least(probs, 0, n, std::max(floor, std::numeric_limits<double>::denorm_min()), picked);
  int64_t cursor[kBuckets];
  std::copy(start_, start_ + last + 1, cursor);
  Candidate* items = items_.data();
  for (int64_t i = 0; i < m; ++i) {
    const int64_t j = picked[i];
    items[cursor[bucket[j]]++] = {probs[j], ids ? ids[j] : id_base + j};
  }

  kept_ = wanted;
  mass_ = wanted == positive ? sum(probs, n) : -1.0;
  if (kept_ < offset) {
    sort_bucket(last);
    count_[last] = static_cast<int32_t>(kept_ - start_[last]);
  }
}

void ProbBuckets::drop_last() {
  sort_bucket(last_);
  --kept_;
  --count_[last_];
  mass_known_[last_] = false;
  mass_ = -1.0;
  while (last_ >= 0 && count_[last_] == 0) --last_;
}

const Candidate& ProbBuckets::ranked_at(int64_t position) {
  sort_bucket(bucket_of(position));
  return items_[position];
}

double ProbBuckets::mass() {
  if (mass_ < 0.0) {
    mass_ = 0.0;
    for (int b = 0; b <= last_; ++b) mass_ += bucket_mass(b);
  }
  return mass_;
}

double ProbBuckets::min_prob() {
  sort_bucket(last_);
  return items_[kept_ - 1].prob;
}

void ProbBuckets::sort_prefix(int64_t n) {
  if (n <= 0) return;
  const int end = bucket_of(n - 1);
  for (int b = 0; b <= end; ++b) sort_bucket(b);
}

int64_t ProbBuckets::find_mass(double x, bool strict, double* before) {
  auto reaches = [&](double m) { return strict ? m > x : m >= x; };
  double acc = 0.0;
  int b = 0;
  for (; b <= last_; ++b) {
    const double m = bucket_mass(b);
    if (reaches(acc + m)) break;
    acc += m;
  }
  for (; b <= last_; ++b) {
    sort_bucket(b);
    for (int64_t i = start_[b]; i < start_[b] + count_[b]; ++i) {
      if (reaches(acc + items_[i].prob)) {
        *before = acc;
        return i;
      }
      acc += items_[i].prob;
    }
  }
  *before = acc;
  return kept_;
}

void ProbBuckets::sort_bucket(int b) {
  if (sorted_[b]) return;
  std::sort(items_.begin() + start_[b], items_.begin() + start_[b + 1], ranks_before);
  sorted_[b] = true;
}

double ProbBuckets::bucket_mass(int b) {
  if (!mass_known_[b]) {
    double m = 0.0;
    for (int64_t i = start_[b]; i < start_[b] + count_[b]; ++i) m += items_[i].prob;
    bucket_mass_[b] = m;
    mass_known_[b] = true;
  }
  return bucket_mass_[b];
}

int ProbBuckets::bucket_of(int64_t position) const {
  return static_cast<int>(std::upper_bound(start_, start_ + last_ + 2, position) - start_) - 1;
}

}  // namespace vivace
