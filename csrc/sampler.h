#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "prob_buckets.h"
#include "torch_numerics.h"

namespace vivace {

struct SamplingParams {
  double temperature;  // 0 = greedy
  int64_t top_k;       // <= 0 = off
  double top_p;        // >= 1 = off
  int64_t vocab_lo;    // allowed window [vocab_lo, vocab_hi), already clipped to the vocabulary
  int64_t vocab_hi;
  uint64_t seed;
  uint64_t stream;
  uint64_t step;
};

enum class RowError { none, nan_logit, positive_inf_logit, no_finite_logit };

// Per-thread working memory, grown to the vocabulary size on first use.
struct SamplerScratch {
  std::vector<double> logits;
  std::vector<double> probs;
  std::vector<double> padded;
  std::vector<int64_t> picked;
  ProbBuckets buckets;

  double* logit_row(int64_t vocab) {
    if (static_cast<int64_t>(logits.size()) < vocab) logits.resize(vocab);
    return logits.data();
  }
};

// Draws one token from the float64 logits in scratch.logit_row(vocab)[vocab_lo, vocab_hi) with the
// semantics and rounding of vivace.sampling.sample. The row is overwritten.
RowError sample_row(int64_t vocab, const SamplingParams& params, const TorchNumerics& numerics,
                    SamplerScratch& scratch, int64_t* token);

// Clips params' window to [0, vocab); false when nothing of the vocabulary is left in it.
bool clip_window(SamplingParams& params, int64_t vocab);
// One line naming the row (`what`), its window as given, and that it holds no token of the vocabulary.
std::string describe_empty_window(const std::string& what, int64_t vocab_lo, int64_t vocab_hi, int64_t vocab);

// Draws a token per row (windows already clipped) on up to `threads` threads, each with its own scratch:
// fill(r, x) writes row r's float64 logits into x[vocab_lo, vocab_hi). Returns the first row whose logits are bad,
// with its error in *error, or -1. Runs without the GIL; rethrows std::bad_alloc after the rows.
int64_t sample_rows(const std::vector<SamplingParams>& rows, int64_t vocab, const TorchNumerics& numerics, int threads,
                    const std::function<void(int64_t, double*)>& fill, int64_t* tokens, RowError* error);

// One line naming the row (`what`), its window and what is wrong with its logits.
std::string describe_row_error(const std::string& what, const SamplingParams& params, RowError error);

// Threads worth waking for rows x vocab logits: requested (0 = one per hardware thread), capped by the rows and
// by the work (a second thread costs more to wake than a few thousand logits take).
int sampling_threads(int requested, int64_t rows, int64_t vocab);

}  // namespace vivace
