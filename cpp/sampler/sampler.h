// Picks the next token from a row of logits: greedy, or temperature + top-k + top-p with a
// seeded generator. Works on host floats; knows nothing of tensors or models.
#pragma once
#include <cstdint>
#include <random>
#include <vector>

namespace babyrt {

struct SamplingParams {
  float temperature = 0.8f;  // 0: greedy
  int64_t top_k = 0;         // 0: off
  float top_p = 0.95f;       // 1: off; must be in (0, 1]
  uint64_t seed = 0;
};

// Throws ArgumentError when a value is out of range.
void validate(const SamplingParams& p);

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);
  int32_t sample(const float* logits, int64_t n);

 private:
  double uniform();  // [0, 1), the same on every platform for a seed

  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> candidates_;  // reused: no per-token allocation
};

}  // namespace babyrt
