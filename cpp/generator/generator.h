// Text generation: prefill the prompt, then decode one token at a time with the KV cache,
// stopping at EOS, a stop string or max_new_tokens.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "sampler/sampler.h"

namespace babyrt {

class Backend;
class Tokenizer;

inline constexpr int64_t kMaxNewTokensLimit = 1'000'000;

struct GenerateOptions {
  int64_t max_new_tokens = 256;
  SamplingParams sampling;
  std::vector<std::string> stop;  // generation ends before the first occurrence of any
};

struct GenerationStats {
  int64_t prompt_tokens = 0;
  int64_t generated_tokens = 0;
  int64_t decode_steps = 0;     // forward calls after the prefill
  double prefill_seconds = 0;
  double decode_seconds = 0;
  std::string finish_reason;    // eos | stop | length
};

// Throws ArgumentError for values out of range.
void validate(const GenerateOptions& options);

// One generation in flight. It owns its KV cache and sampler, so several can run at once on
// one backend.
class Generation {
 public:
  Generation(const Backend& backend, const Tokenizer& tokenizer, std::string_view prompt,
             const GenerateOptions& options);
  ~Generation();
  Generation(const Generation&) = delete;
  Generation& operator=(const Generation&) = delete;

  // The next piece of text into `piece` (non-empty); false once generation has finished.
  bool next(std::string& piece);
  // Runs to the end and returns all the text.
  std::string run();

  const GenerationStats& stats() const;
  const std::vector<int32_t>& tokens() const;  // prompt and generated ids

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace babyrt
