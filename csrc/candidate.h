#pragma once
#include <cstdint>

namespace vivace {

struct Candidate {
  double prob;
  int64_t id;
};

// The reference's sort order: probability descending, ties by lower token id first.
inline bool ranks_before(const Candidate& a, const Candidate& b) {
  return a.prob > b.prob || (a.prob == b.prob && a.id < b.id);
}

}  // namespace vivace
