#include "sampler/sampler.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "errors.h"

namespace babyrt {

void validate(const SamplingParams& p) {
  if (!std::isfinite(p.temperature) || p.temperature < 0)
    throw ArgumentError("temperature must be a finite number >= 0, got " +
                        std::to_string(p.temperature));
  if (p.top_k < 0) throw ArgumentError("top_k must be >= 0 (0 turns it off), got " +
                                       std::to_string(p.top_k));
  if (!(p.top_p > 0 && p.top_p <= 1))
    throw ArgumentError("top_p must be in (0, 1], got " + std::to_string(p.top_p));
}

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {
  validate(params);
}

double Sampler::uniform() { return static_cast<double>(rng_() >> 11) * 0x1.0p-53; }

int32_t Sampler::sample(const float* logits, int64_t n) {
  // Greedy: the first maximum, NaN never wins.
  if (params_.temperature == 0) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; ++i)
      if (logits[i] > logits[best] || std::isnan(logits[best])) best = i;
    return static_cast<int32_t>(best);
  }
  // Candidates ordered by (logit desc, id asc), so equal logits sample the same way everywhere.
  auto before = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  candidates_.resize(n);
  for (int64_t i = 0; i < n; ++i)
    candidates_[i] = {std::isnan(logits[i]) ? -INFINITY : logits[i], static_cast<int32_t>(i)};
  int64_t keep = n;
  if (params_.top_k > 0 && params_.top_k < n) {
    keep = params_.top_k;
    std::partial_sort(candidates_.begin(), candidates_.begin() + keep, candidates_.end(), before);
  }
  // Softmax at temperature over the kept candidates, in double.
  float max_logit = -INFINITY;
  for (int64_t i = 0; i < keep; ++i) max_logit = std::max(max_logit, candidates_[i].first);
  double total = 0;
  for (int64_t i = 0; i < keep; ++i) {
    const float p = static_cast<float>(
        std::exp((static_cast<double>(candidates_[i].first) - max_logit) / params_.temperature));
    candidates_[i].first = p;
    total += p;
  }
  if (params_.top_p < 1) {
    // Only tokens with p >= (1 - top_p) / (keep - 1) can be in the nucleus (llama2.c's
    // bound), so sort just those, not the whole vocabulary.
    const double cutoff = keep > 1 ? (1.0 - params_.top_p) / (keep - 1) * total : 0.0;
    auto end = std::partition(candidates_.begin(), candidates_.begin() + keep,
                              [&](const auto& c) { return c.first >= cutoff; });
    if (end == candidates_.begin()) end = candidates_.begin() + keep;  // bound excluded all
    std::sort(candidates_.begin(), end, before);
    const int64_t m = end - candidates_.begin();
    double cum = 0;
    int64_t last = m - 1;
    for (int64_t i = 0; i < m; ++i) {
      cum += candidates_[i].first;
      if (cum > params_.top_p * total) {
        last = i;
        break;
      }
    }
    keep = last + 1;
    total = 0;
    for (int64_t i = 0; i < keep; ++i) total += candidates_[i].first;
  }
  const double r = uniform() * total;
  double cum = 0;
  for (int64_t i = 0; i < keep; ++i) {
    cum += candidates_[i].first;
    if (r < cum) return candidates_[i].second;
  }
  return candidates_[keep - 1].second;  // rounding
}

}  // namespace babyrt
