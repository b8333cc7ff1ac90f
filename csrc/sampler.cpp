#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <thread>

#include "counter_rng.h"
#include "row_kernels.h"

namespace vivace {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// torch.argmax over the masked row: the first NaN if any, else the first maximum; a window of -inf
// leaves every entry -inf, so the answer is token 0.
int64_t greedy_token(const double* x, int64_t lo, int64_t hi) {
  int64_t best = -1;
  double best_value = -kInf;
  for (int64_t j = lo; j < hi; ++j) {
    if (std::isnan(x[j])) return j;
    if (x[j] > best_value) {
      best_value = x[j];
      best = j;
    }
  }
  return best < 0 ? 0 : best;
}

// probs[lo, hi) = torch.softmax(x / temperature) over the masked row, rounded as torch rounds it.
RowError softmax(double* x, int64_t lo, int64_t hi, double temperature, const TorchNumerics& numerics,
                 double* probs, double* p_max) {
  const double max = scale_and_max(x + lo, hi - lo, temperature);
  if (std::isnan(max)) return RowError::nan_logit;
  if (max == kInf) return RowError::positive_inf_logit;
  if (max == -kInf) return RowError::no_finite_logit;

  shifted_exp(x + lo, max, probs + lo, hi - lo, numerics.sleef_exp);
  const double inverse = 1.0 / lane_sum(probs, lo, hi, numerics.softmax_lanes);
  multiply(probs + lo, hi - lo, inverse);
  *p_max = inverse;  // the maximum logit has exp(0) == 1
  return RowError::none;
}

// The reference's steps 4-5 on the rank-ordered kept candidates, operation for operation.
int64_t exact_draw(ProbBuckets& buckets, int64_t vocab, double top_p, double u, const TorchNumerics& numerics,
                   std::vector<double>& padded) {
  const int64_t k = buckets.size();
  buckets.sort_prefix(k);
  const Candidate* ranked = buckets.items();
  padded.assign(vocab, 0.0);
  for (int64_t i = 0; i < k; ++i) padded[i] = ranked[i].prob;
  const double kept_mass = cascade_sum(padded.data(), vocab, numerics.sum_lanes);

  double cumulative = 0.0;
  int64_t kept = 0;
  for (int64_t i = 0; i < k; ++i) {
    cumulative += ranked[i].prob;
    const bool keep = (cumulative - ranked[i].prob) / kept_mass < top_p || i == 0;
    padded[i] = keep ? ranked[i].prob : 0.0;
    kept += keep;
  }
  double total = 0.0;
  for (int64_t i = 0; i < k; ++i) total += padded[i];
  const double threshold = u * total;
  int64_t index = vocab;
  cumulative = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    cumulative += padded[i];
    if (cumulative > threshold) {
      index = i;
      break;
    }
  }
  return ranked[std::min(index, kept - 1)].id;
}

// The same draw without ranking every kept candidate: exact prefix masses decide which candidates top_p
// keeps and where u lands, and the answer is accepted only when every such decision clears a margin
// that bounds the reference's float64 rounding (running sums and torch's cascaded sum over at most
// k + vocab terms). Returns false when a decision is too close to call.
bool certified_draw(ProbBuckets& buckets, int64_t vocab, double top_p, double u, int64_t* token) {
  const int64_t k = buckets.size();
  const double mass = buckets.mass();
  const double slack = 8.0 * static_cast<double>(k + vocab + 16) * 0x1p-53;
  const double margin = slack * mass;
  const Candidate* ranked = buckets.items();

  int64_t kept = k;
  double kept_lo = mass, kept_hi = mass;
  const bool tail_in_doubt = top_p >= 1.0 && !(buckets.min_prob() > (1.0 + slack - top_p) * mass);
  if (top_p < 1.0 || tail_in_doubt) {
    double before;
    const int64_t last = buckets.find_mass((top_p - slack) * mass, false, &before);
    if (last >= k) return false;
    kept = last + 1;
    kept_lo = before + ranked[last].prob;
    kept_hi = top_p < 1.0 ? kept_lo : mass;
    if (top_p < 1.0 && !(kept_lo >= (top_p + slack) * mass)) return false;
  }
  double before;
  const int64_t index = buckets.find_mass(u * kept_lo - margin, true, &before);
  if (index >= kept || !(before + ranked[index].prob > u * kept_hi + margin)) return false;
  *token = ranked[index].id;
  return true;
}

constexpr int64_t kExactBelow = 32;

}  // namespace

RowError sample_row(int64_t vocab, const SamplingParams& params, const TorchNumerics& numerics,
                    SamplerScratch& scratch, int64_t* token) {
  double* x = scratch.logit_row(vocab);
  const int64_t lo = params.vocab_lo, hi = params.vocab_hi;
  if (params.temperature == 0.0) {
    *token = greedy_token(x, lo, hi);
    return RowError::none;
  }
  if (static_cast<int64_t>(scratch.probs.size()) < vocab) scratch.probs.resize(vocab);
  double p_max;
  const RowError error = softmax(x, lo, hi, params.temperature, numerics, scratch.probs.data(), &p_max);
  if (error != RowError::none) return error;

  ProbBuckets& buckets = scratch.buckets;
  buckets.build(scratch.probs.data(), lo, hi, p_max, params.top_k > 0 ? params.top_k : vocab);
  const double u = counter_uniform(params.seed, params.stream, params.step);
  if (buckets.size() >= kExactBelow && certified_draw(buckets, vocab, params.top_p, u, token))
    return RowError::none;
  *token = exact_draw(buckets, vocab, params.top_p, u, numerics, scratch.padded);
  return RowError::none;
}

std::string describe_row_error(const std::string& what, const SamplingParams& params, RowError error) {
  const std::string window =
      "vocab window [" + std::to_string(params.vocab_lo) + ", " + std::to_string(params.vocab_hi) + ")";
  switch (error) {
    case RowError::nan_logit: return what + " has a NaN inside its " + window;
    case RowError::positive_inf_logit: return what + " reaches +inf inside its " + window + " after dividing by the temperature";
    case RowError::no_finite_logit: return what + " is -inf everywhere inside its " + window;
    default: return what + " failed";
  }
}

int sampling_threads(int requested, int64_t rows, int64_t vocab) {
  constexpr int64_t kLogitsPerThread = 8192;
  static const int hardware_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int threads = requested > 0 ? requested : hardware_threads;
  return static_cast<int>(std::min<int64_t>({threads, rows, std::max<int64_t>(1, rows * vocab / kLogitsPerThread)}));
}

}  // namespace vivace
