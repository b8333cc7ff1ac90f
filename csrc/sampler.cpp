#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <thread>

#include "counter_rng.h"
#include "row_kernels.h"
#include "thread_pool.h"

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

// probs[lo, hi) = torch.softmax(x / temperature) over the masked row, rounded as torch rounds it; x already holds
// x / temperature and max is its maximum (finite).
void softmax(const double* x, int64_t lo, int64_t hi, double max, const TorchNumerics& numerics, double* probs,
             double* p_max) {
  shifted_exp(x + lo, max, probs + lo, hi - lo, numerics.sleef_exp);
  const double inverse = 1.0 / lane_sum(probs, lo, hi, numerics.softmax_lanes);
  multiply(probs + lo, hi - lo, inverse);
  *p_max = inverse;  // the maximum logit has exp(0) == 1
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
bool certified_draw(ProbBuckets& buckets, int64_t vocab, double top_p, double u, int64_t* position) {
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
  *position = index;
  return true;
}

constexpr int64_t kExactBelow = 32;

// Exp values (before normalisation) far enough apart that their probabilities cannot round to one value, which the
// reference would rank by token id whatever their order here.
bool separated(double e_high, double e_low) { return e_high > e_low * (1.0 + 0x1p-46); }

// top_k sampling without the softmax of the whole row. Probabilities are exp(x - max) times one common factor
// (1 / the row's sum), and top-k, top-p and the draw only compare probabilities with each other or with shares
// of the kept mass, so exp values stand in for them: up to rounding, which certified_draw's margin covers, and
// up to ties, which the guards below refuse. Candidates are every x above a threshold that leaves at least
// top_k + 1 of them; only they are exponentiated (with the reference's exp). Returns false, leaving x as it
// was, whenever a decision is too close to call; the full path then decides.
bool sample_top_k(const double* x, int64_t vocab, int64_t lo, int64_t hi, double max, const SamplingParams& params,
                  double u, const TorchNumerics& numerics, SamplerScratch& scratch, int64_t* token) {
  const int64_t n = hi - lo, k = params.top_k;
  if (k < kExactBelow || 4 * k > n) return false;
  // A histogram of max - x (in 1/8 steps) over every 4th x estimates where the (k + 1)-th largest x lies; the
  // threshold then steps down until at least k + 1 candidates are above it.
  constexpr int kBins = 256, kStride = 4;
  constexpr double kBinsPerUnit = 8.0;  // 256 bins reach 32 below the maximum
  if (static_cast<int64_t>(scratch.picked.size()) < n + 8) scratch.picked.resize(n + 8);
  int64_t* picked = scratch.picked.data();
  int32_t counts[kBins] = {};
  for (int64_t i = lo; i < hi; i += kStride) {
    const double depth = (max - x[i]) * kBinsPerUnit;
    ++counts[depth < kBins - 1 ? static_cast<int>(depth) : kBins - 1];
  }
  const int64_t wanted = (k + 1) * 9 / (8 * kStride) + 1;  // an eighth more than the sample's share
  int64_t covered = 0;
  int last = -1;
  while (covered < wanted && last < kBins - 2) covered += counts[++last];
  int64_t m = 0;
  for (; last < kBins - 1; last += 2) {
    // bins 0..last hold x >= max - (last + 1) / 8 up to rounding, which the extra 1/128 absorbs
    m = indices_at_least(x, lo, hi, max - (last + 1.0625) / kBinsPerUnit, picked);
    if (m >= k + 1) break;
  }
  if (m < k + 1) return false;  // the cut lies in the open-ended last bin
  if (static_cast<int64_t>(scratch.padded.size()) < 2 * m) scratch.padded.resize(2 * m);
  double* candidate_x = scratch.padded.data();
  double* candidate_e = candidate_x + m;
  for (int64_t j = 0; j < m; ++j) candidate_x[j] = x[picked[j]];
  shifted_exp(candidate_x, max, candidate_e, m, numerics.sleef_exp);

  ProbBuckets& buckets = scratch.buckets;
  buckets.build_candidates(candidate_e, picked, m, 1.0, k + 1);
  if (buckets.size() != k + 1) return false;  // exp underflowed to 0 among the first k + 1
  const double first_out = buckets.min_prob();  // the (k + 1)-th; SLEEF's exp is within 1 ulp, so every
  buckets.drop_last();                          // x outside the candidates has an exp at most this (1 + 2^-51)
  const double last_kept = buckets.min_prob();
  if (!separated(last_kept, first_out) || !(last_kept >= 0x1p-990)) return false;

  int64_t position;
  if (!certified_draw(buckets, vocab, params.top_p, u, &position)) return false;
  const double chosen = buckets.ranked_at(position).prob;
  if (position > 0 && !separated(buckets.ranked_at(position - 1).prob, chosen)) return false;
  if (position + 1 < k && !separated(chosen, buckets.ranked_at(position + 1).prob)) return false;
  *token = buckets.ranked_at(position).id;
  return true;
}

}  // namespace

RowError sample_row(int64_t vocab, const SamplingParams& params, const TorchNumerics& numerics,
                    SamplerScratch& scratch, int64_t* token) {
  double* x = scratch.logit_row(vocab);
  const int64_t lo = params.vocab_lo, hi = params.vocab_hi;
  if (params.temperature == 0.0) {
    *token = greedy_token(x, lo, hi);
    return RowError::none;
  }
  const double max = scale_and_max(x + lo, hi - lo, params.temperature);
  if (std::isnan(max)) return RowError::nan_logit;
  if (max == kInf) return RowError::positive_inf_logit;
  if (max == -kInf) return RowError::no_finite_logit;
  const double u = counter_uniform(params.seed, params.stream, params.step);
  if (sample_top_k(x, vocab, lo, hi, max, params, u, numerics, scratch, token)) return RowError::none;

  if (static_cast<int64_t>(scratch.probs.size()) < vocab) scratch.probs.resize(vocab);
  double p_max;
  softmax(x, lo, hi, max, numerics, scratch.probs.data(), &p_max);
  ProbBuckets& buckets = scratch.buckets;
  buckets.build(scratch.probs.data(), lo, hi, p_max, params.top_k > 0 ? params.top_k : vocab);
  int64_t position;
  if (buckets.size() >= kExactBelow && certified_draw(buckets, vocab, params.top_p, u, &position)) {
    *token = buckets.items()[position].id;
    return RowError::none;
  }
  *token = exact_draw(buckets, vocab, params.top_p, u, numerics, scratch.padded);
  return RowError::none;
}

bool clip_window(SamplingParams& params, int64_t vocab) {
  params.vocab_lo = std::clamp<int64_t>(params.vocab_lo, 0, vocab);
  params.vocab_hi = std::clamp<int64_t>(params.vocab_hi, 0, vocab);
  return params.vocab_lo < params.vocab_hi;
}

std::string describe_empty_window(const std::string& what, int64_t vocab_lo, int64_t vocab_hi, int64_t vocab) {
  return what + ": vocab window [" + std::to_string(vocab_lo) + ", " + std::to_string(vocab_hi) +
         ") holds no token of the " + std::to_string(vocab) + "-token vocabulary";
}

int64_t sample_rows(const std::vector<SamplingParams>& rows, int64_t vocab, const TorchNumerics& numerics, int threads,
                    const std::function<void(int64_t, double*)>& fill, int64_t* tokens, RowError* error) {
  const int64_t n = static_cast<int64_t>(rows.size());
  std::vector<RowError> errors(n, RowError::none);
  std::vector<char> out_of_memory(n, 0);
  parallel_for(n, threads, [&](int64_t r) {
    try {
      thread_local SamplerScratch scratch;
      fill(r, scratch.logit_row(vocab));
      errors[r] = sample_row(vocab, rows[r], numerics, scratch, &tokens[r]);
    } catch (const std::bad_alloc&) {
      out_of_memory[r] = 1;
    }
  });
  for (int64_t r = 0; r < n; ++r) {
    if (out_of_memory[r]) throw std::bad_alloc();
    if (errors[r] != RowError::none) {
      *error = errors[r];
      return r;
    }
  }
  return -1;
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
