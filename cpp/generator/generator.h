// Text generation: prefill the prompt, then decode one token at a time with the KV cache,
// stopping at EOS, a stop string or max_new_tokens. On the CPU the host samples each token;
// on CUDA the tokens stay on the device (device_loop.h) and the host reads them back every
// `sync_every` steps.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "sampler/sampler.h"

namespace babyrt {

class Backend;
class DeviceLoopPool;
class Tokenizer;

inline constexpr int64_t kMaxNewTokensLimit = 1'000'000;

struct GenerateOptions {
  int64_t max_new_tokens = 256;
  SamplingParams sampling;
  std::vector<std::string> stop;  // generation ends before the first occurrence of any
  int64_t sync_every = 16;        // on-device decoding: steps between reads of the tokens
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
  // loops: where on-device decoding borrows its loop; null decodes on the host.
  Generation(const Backend& backend, const Tokenizer& tokenizer, std::string_view prompt,
             const GenerateOptions& options, DeviceLoopPool* loops = nullptr);
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

struct BatchResult {
  std::vector<std::string> texts;
  std::vector<GenerationStats> stats;  // per prompt; the seconds are the batch's
};

// Several prompts decoded together as one batch, each with its own stop. A KV-cache model
// decodes them on a DeviceLoop (no sliding past the context: a sequence that fills it ends
// with "length"); a window model runs them one after another.
BatchResult generate_batch(const Backend& backend, const Tokenizer& tokenizer, DeviceLoopPool& loops,
                           const std::vector<std::string>& prompts, const GenerateOptions& options);

}  // namespace babyrt
