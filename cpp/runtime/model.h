// babyrt's public C++ API: a loaded artifact that encodes, decodes, generates and returns
// logits. This header pulls in no torch headers, so front ends compile fast.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "artifact/artifact.h"
#include "errors.h"
#include "generator/generator.h"

namespace babyrt {

class Backend;
class DeviceLoopPool;
class Tokenizer;

struct LoadOptions {
  std::string device = "cpu";  // cpu | cuda | cuda:N
  std::string dtype;           // fp32 | bf16 | fp16; empty: as stored in the artifact
};

// Row-major host logits.
struct Logits {
  std::vector<float> data;
  int64_t rows = 0, cols = 0;
};

class Model {
 public:
  // Validates the metadata and the tokenizer before loading the module.
  static std::shared_ptr<Model> load(const std::string& artifact_dir, const LoadOptions& options);
  ~Model();

  const Metadata& metadata() const { return metadata_; }
  std::string device() const;
  std::string dtype() const;

  std::vector<int32_t> encode(std::string_view text, bool add_bos) const;
  std::string decode(const std::vector<int32_t>& ids) const;

  // A generation in flight; it keeps the model alive.
  std::unique_ptr<Generation> start(std::string_view prompt, const GenerateOptions& options) const;
  // Runs to the end. on_piece (optional) sees each piece of text as it is made.
  std::string generate(std::string_view prompt, const GenerateOptions& options,
                       GenerationStats* stats = nullptr,
                       const std::function<void(std::string_view)>& on_piece = {}) const;

  // Several prompts at once, each with its own stop (generator.h: generate_batch).
  BatchResult generate_batch(const std::vector<std::string>& prompts,
                             const GenerateOptions& options) const;

  // Logits for every position of `ids`: the first `prefill` tokens go in one forward call,
  // the rest one at a time through the KV cache. prefill <= 0 means all of them at once.
  Logits logits(const std::vector<int32_t>& ids, int64_t prefill = 0) const;

 private:
  Model() = default;
  Metadata metadata_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<DeviceLoopPool> loops_;  // after backend_: its loops go first
};

const char* version();

}  // namespace babyrt
